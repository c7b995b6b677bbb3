from mailplat import plugins
from mailplat.config import PluginChoice, parseConfig
from mailplat.interfaces.conversion import IConverter
from mailplat.mime.convert import HTMLToPlain, PlainToHTML, Registry
from mailplat.platform import Platform
from zope.interface.verify import verifyObject


def test_plainToHTMLEscapes():
    out, params = PlainToHTML().convert("a < b & \"c\"\r\nnext é".encode("latin-1"), {"charset": "latin-1"})
    assert params == {"charset": "utf-8"}
    text = out.decode("utf-8")
    assert "a &lt; b &amp; &quot;c&quot;<br>" in text and "next é" in text


def test_htmlToPlain():
    src = b"<html><head><style>p{}</style><script>alert(1)</script></head><body><p>Hello&nbsp;<b>you</b></p>" \
          b"<div>line two</div><br>caf&eacute;</body></html>"
    out, _ = HTMLToPlain().convert(src, {})
    assert out == "Hello you\r\n\r\nline two\r\n\r\ncafé\r\n".encode("utf-8")


def test_registryFirstWinsAndPlatformBuiltins(tmp_path):
    class Mine:
        sourceType, targetType = "text/plain", "text/html"

        def convert(self, data, parameters):
            return b"mine", {}

    r = Registry([Mine(), PlainToHTML()])
    assert r.convert(b"x", "TEXT/PLAIN", "text/html") == (b"mine", {})
    platform = Platform(parseConfig(f'[server]\ndata = "{tmp_path}"\n'))
    assert ("text/html", "text/plain") in platform.converters.pairs()
    for c in plugins.build("converter", PluginChoice("text"), platform.context):
        verifyObject(IConverter, c)
