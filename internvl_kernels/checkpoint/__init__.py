"""Checkpoint I/O, below the quantized runtime and the models: weight files (:mod:`.files`), the config reader
(:mod:`.config`) and the InternLM2 layout (:mod:`.internlm2`). Imports no model and no kernel."""
from .config import UnsupportedConfigError, config_dtype, read_config, read_quant_config
from .files import (CheckpointError, checkpoint_files, iter_tensors, load_into_module, load_state_dict,
                    save_state_dict, strip_prefix)

__all__ = ["CheckpointError", "UnsupportedConfigError", "read_config", "read_quant_config", "config_dtype",
           "checkpoint_files", "iter_tensors", "load_state_dict", "save_state_dict", "strip_prefix", "load_into_module"]
