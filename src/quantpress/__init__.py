"""quantpress: quantize open LLMs into GPTQ releases every loader reads, evaluate and run them.

    import quantpress
    report = quantpress.quantize("my-llama", "my-llama-gptq", quantpress.recommended(bits=4, group_size=128))
    print(quantpress.evaluate("my-llama-gptq").perplexity)

`recommended(...)` fills every setting you leave open with the levers that measured best (static
act-order, weighted range search, damping per module); `QuantConfig(...)` is plain classic GPTQ.
"""

__version__ = "0.1.0"

from quantpress.api import (  # noqa: E402  (the version must exist before submodules import it)
    Completion,
    EvalResult,
    LoadedModel,
    QuantizeReport,
    SamplingParams,
    bundled_model_dir,
    evaluate,
    generate,
    load,
    quantize,
)
from quantpress.config import CalibrationConfig, Method, QuantConfig, recommended, variant_name  # noqa: E402

__all__ = [
    "CalibrationConfig", "Completion", "EvalResult", "LoadedModel", "Method", "QuantConfig", "QuantizeReport",
    "SamplingParams", "bundled_model_dir", "evaluate", "generate", "load", "quantize", "recommended",
    "variant_name",
]
