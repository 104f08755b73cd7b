"""DenseLoRA (Mu et al., ACL 2025): dense low-rank adaptation with shared encoder/decoder, as a peft method.

Importing this package registers the peft type "DENSELORA", so ``peft.get_peft_model(model, DenseLoraConfig(...))``
and ``peft.PeftModel.from_pretrained(base, adapter_dir)`` work as for any built-in method.
"""

import logging

# bitsandbytes warns at import, on every CPU with AVX512-BF16, that an optional kernel package is missing; that kernel
# serves a 4-bit inference path this package does not use, so the line is noise on every command.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .config import DEFAULT_TARGET_MODULES, DenseLoraConfig  # noqa: E402
from .layer import DenseLoraLayer  # noqa: E402
from .model import DenseLoraModel, register  # noqa: E402

register()

__all__ = ["DEFAULT_TARGET_MODULES", "DenseLoraConfig", "DenseLoraLayer", "DenseLoraModel"]
__version__ = "0.1.0"
