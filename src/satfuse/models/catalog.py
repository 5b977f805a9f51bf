"""The built-in backbones and pretraining methods, by name, without importing torch.

Each name points at the class that implements it (`Registry.register_lazy`); the class is
imported on first use. Why: `satfuse submit` and the config checks list and validate
`model.backbone` / `model.method` on a login node without paying for torch, and the order here
is the order users see.
"""

from satfuse.registry import BACKBONES, METHODS

for _name, _target in (("tiny", "satfuse.models.resnet:TinyResNet"),
                       ("resnet18", "satfuse.models.resnet:ResNet18"),
                       ("resnet50", "satfuse.models.resnet:ResNet50"),
                       ("vit_small_patch16", "satfuse.models.timm_backbones:VitSmallPatch16"),
                       ("vit_base_patch16", "satfuse.models.timm_backbones:VitBasePatch16"),
                       ("swin_tiny_patch4_window7", "satfuse.models.timm_backbones:SwinTinyPatch4Window7")):
    BACKBONES.register_lazy(_name, _target)
BACKBONES.register_prefix("timm:", "satfuse.models.timm_backbones:timm_backbone_class", "timm:<any timm model>")

for _name, _target in (("dual_simclr", "satfuse.models.methods:DualSimCLR"),
                       ("simclr", "satfuse.models.methods:SimCLR"),
                       ("mma", "satfuse.models.methods:MMA")):
    METHODS.register_lazy(_name, _target)
