"""Self-supervised pre-training of detkit backbones on unlabeled images.

* :mod:`.base`     ``SSLMethod`` (the model interface the trainer drives) and ``SSL_METHODS``
* :mod:`.moco`     MoCo v2;  :mod:`.simclr` SimCLR;  :mod:`.byol` BYOL and SimSiam;  :mod:`.dino` DINO
* :mod:`.losses`   InfoNCE, NT-Xent, cosine terms, DINO cross-entropy, cross-rank gathers
* :mod:`.heads`    projection / prediction / DINO heads, momentum updates
* :mod:`.views`    view augmentations (random resized crop + albumentations, multi-crop)
* :mod:`.data`     ``ImageFolder`` and ``MultiViewDataset`` (registered datasets)
* :mod:`.engine`   ``pretrain(cfg, work_dir)`` on the detection trainer (``tools/pretrain.py``)

Fine-tuning: ``model.backbone.weights: work_dirs/<run>/last.pth`` in a detector config loads
the backbone the method transfers (``detkit.models.pretrained``).
"""

from .base import SSL_METHODS, SSLMethod, build_method
from .byol import BYOL, SimSiam
from .data import ImageFolder, MultiViewDataset
from .dino import DINO
from .engine import PretrainTrainer, pretrain
from .moco import MoCoV2
from .simclr import SimCLR
from .views import MultiView, ViewGroup, build_views

__all__ = ["SSL_METHODS", "SSLMethod", "build_method", "MoCoV2", "SimCLR", "BYOL", "SimSiam", "DINO",
           "ImageFolder", "MultiViewDataset", "MultiView", "ViewGroup", "build_views",
           "PretrainTrainer", "pretrain"]
