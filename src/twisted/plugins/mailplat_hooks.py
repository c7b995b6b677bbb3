"""mailplat's built-in pre-queue SMTP hooks, found by name like any third-party hook."""

from mailplat.hooks.dnsbl import DNSBLHookFactory
from mailplat.hooks.greylist import GreylistHookFactory
from mailplat.hooks.limits import LimitsHookFactory
from mailplat.hooks.verify import VerifyHookFactory

limitsHook = LimitsHookFactory()
dnsblHook = DNSBLHookFactory()
verifyHook = VerifyHookFactory()
greylistHook = GreylistHookFactory()
