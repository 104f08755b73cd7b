"""DenseLoRA (Mu et al., ACL 2025): dense low-rank adaptation with shared encoder/decoder, as a peft method.

Importing this package registers the peft type "DENSELORA", so ``peft.get_peft_model(model, DenseLoraConfig(...))``
and ``peft.PeftModel.from_pretrained(base, adapter_dir)`` work as for any built-in method.
"""

from .config import DEFAULT_TARGET_MODULES, DenseLoraConfig
from .layer import DenseLoraLayer
from .model import DenseLoraModel, register

register()

__all__ = ["DEFAULT_TARGET_MODULES", "DenseLoraConfig", "DenseLoraLayer", "DenseLoraModel"]
__version__ = "0.1.0"
