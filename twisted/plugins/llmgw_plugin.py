"""The C{twistd llmgw} dropin.  Nothing else lives here: see L{twisted_gw}."""

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_gw.config import Options


@implementer(IServiceMaker, IPlugin)
class _GatewayServiceMaker:
    tapname = "llmgw"
    description = "Gateway in front of an OpenAI-compatible LLM server (llama.cpp)."
    options = Options

    def makeService(self, options: Options) -> Any:
        from twisted_gw.service import makeService

        return makeService(options.config)


serviceMaker = _GatewayServiceMaker()
