"""`quantpress serve`: TGI- and OpenAI-compatible HTTP routes over the continuous-batching engine.

    from quantpress.server import ServerSettings, create_app, serve
    serve("my-llama-gptq", port=8080, settings=ServerSettings(max_batch_size=8))
"""

from quantpress.server.app import create_app, serve
from quantpress.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
