"""
THREAD (RFC 5256): the ORDEREDSUBJECT and REFERENCES algorithms over the
index data a store keeps (L{mailplat.interfaces.storage.ISearchIndex}):
base subject, sent date, Message-ID, In-Reply-To and References.

Each message is given as C{(number, entry)} where C{number} is what the
response shows (a sequence number or a UID) and C{entry} is an
L{ISearchIndex.indexData} dict.  Sent dates fall back to the internal date
(RFC 5256 section 2.2).  Ties are broken by C{number}, which is in arrival
order.
"""

from __future__ import annotations


class _Node:
    __slots__ = ("msgid", "message", "parent", "children")

    def __init__(self, msgid=None, message=None):
        self.msgid = msgid
        self.message = message  # (number, entry) or None for a dummy
        self.parent = None
        self.children = []

    def isAncestorOf(self, other) -> bool:
        node = other
        depth = 0
        while node is not None and depth < 10000:
            if node is self:
                return True
            node = node.parent
            depth += 1
        return False


def _date(message):
    number, entry = message
    sent = entry.get("sentDate")
    return (sent if sent is not None else entry.get("internalDate") or 0, number)


def _firstDate(node):
    if node.message is not None:
        return _date(node.message)
    dates = [_firstDate(c) for c in node.children]
    return min(dates) if dates else (0, 0)


def _sortTree(nodes):
    nodes.sort(key=_firstDate)
    stack = list(nodes)
    while stack:
        n = stack.pop()
        n.children.sort(key=_firstDate)
        stack.extend(n.children)
    return nodes


def format(roots) -> bytes:
    """The C{* THREAD} data (without the prefix) of a forest of L{_Node}s."""
    out = []

    def node(n):
        parts = []
        while True:
            if n.message is not None:
                parts.append(b"%d" % n.message[0])
            kids = n.children
            if n.message is not None and len(kids) == 1:
                parts.append(b" ")
                n = kids[0]
                continue
            if kids:
                if n.message is not None:
                    parts.append(b" ")
                parts.append(b"".join(b"(" + node(k) + b")" for k in kids))
            return b"".join(parts)

    for r in roots:
        out.append(b"(" + node(r) + b")")
    return b"".join(out)


def orderedSubject(messages) -> bytes:
    """THREAD=ORDEREDSUBJECT (RFC 5256 section 3)."""
    groups = {}
    for m in sorted(messages, key=lambda m: (m[1].get("sortSubject") or "", _date(m))):
        groups.setdefault(m[1].get("sortSubject") or "", []).append(m)
    roots = []
    for group in groups.values():
        root = _Node(message=group[0])
        for m in group[1:]:
            child = _Node(message=m)
            child.parent = root
            root.children.append(child)
        roots.append(root)
    return format(_sortTree(roots))


def references(messages) -> bytes:
    """THREAD=REFERENCES (RFC 5256 section 3)."""
    table = {}
    anonymous = 0
    for m in sorted(messages, key=lambda m: m[0]):
        entry = m[1]
        msgid = entry.get("messageId")
        if msgid is None or (msgid in table and table[msgid].message is not None):
            anonymous += 1
            msgid = f"\0unique{anonymous}"
        node = table.get(msgid)
        if node is None:
            node = table[msgid] = _Node(msgid)
        node.message = m
        refs = list(entry.get("references") or [])
        if not refs and entry.get("inReplyTo"):
            refs = [entry["inReplyTo"]]
        prev = None
        for ref in refs:
            ref_node = table.get(ref)
            if ref_node is None:
                ref_node = table[ref] = _Node(ref)
            if prev is not None and ref_node.parent is None and not ref_node.isAncestorOf(prev) and ref_node is not prev:
                ref_node.parent = prev
                prev.children.append(ref_node)
            prev = ref_node
        # the message's parent is the last reference (replacing any earlier link)
        if node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None
        if prev is not None and prev is not node and not node.isAncestorOf(prev):
            node.parent = prev
            prev.children.append(node)
    roots = [n for n in table.values() if n.parent is None]

    # prune dummies
    def prune(nodes, atRoot):
        out = []
        for n in nodes:
            n.children = prune(n.children, False)
            for c in n.children:
                c.parent = n
            if n.message is None:
                if not n.children:
                    continue
                if not atRoot or len(n.children) == 1:
                    out.extend(n.children)
                    continue
            out.append(n)
        return out

    roots = prune(roots, True)
    for r in roots:
        r.parent = None

    # gather by base subject
    def subjectOf(n):
        if n.message is not None:
            return n.message[1].get("sortSubject") or "", n.message[1].get("isReply", False)
        kids = sorted(n.children, key=_firstDate)
        if kids and kids[0].message is not None:
            return kids[0].message[1].get("sortSubject") or "", kids[0].message[1].get("isReply", False)
        return "", False

    _sortTree(roots)
    bySubject = {}
    for r in roots:
        subj, reply = subjectOf(r)
        if not subj:
            continue
        old = bySubject.get(subj)
        if old is None or (old.message is not None and r.message is None) or (
            old.message is not None and r.message is not None and subjectOf(old)[1] and not reply
        ):
            bySubject[subj] = r
    result = []
    for r in roots:
        subj, reply = subjectOf(r)
        if not subj:
            result.append(r)
            continue
        target = bySubject[subj]
        if target is r:
            continue
        if target.message is None and r.message is None:
            for c in r.children:
                c.parent = target
            target.children.extend(r.children)
        elif target.message is None:
            r.parent = target
            target.children.append(r)
        elif r.message is not None and reply and not subjectOf(target)[1]:
            r.parent = target
            target.children.append(r)
        else:
            dummy = _Node()
            target.parent = dummy
            r.parent = dummy
            dummy.children = [target, r]
            bySubject[subj] = dummy
    result.extend(n for n in bySubject.values())
    return format(_sortTree(result))


__all__ = ["orderedSubject", "references", "format"]
