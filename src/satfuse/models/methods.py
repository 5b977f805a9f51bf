"""The pretraining-method contract (`PretrainModel`) and the built-in methods registered in
`satfuse.registry.METHODS`: Dual-SimCLR, SimCLR, MMA.

The contract is what the trainer, the loader, the DeepSpeed engine and the export use, and all
they use: a new method is one `PretrainModel` subclass registered under its `model.method` name.
"""

from __future__ import annotations

import abc
import inspect
from typing import ClassVar

import torch
from torch import nn

from satfuse.config import LossConfig, ModelConfig
from satfuse.losses import dense_alignment_loss, nt_xent, retrieval_accuracy_tensor
from satfuse.models.backbones import build_backbone
from satfuse.models.heads import DenseProjectionHead, ProjectionHead
from satfuse.registry import METHODS
from satfuse.utils import SatfuseError

S1_CHANNELS = 2
S2_CHANNELS = 13
SIMCLR_CHANNELS = {"s2_rgb": 3, "s2": S2_CHANNELS, "s1s2": S1_CHANNELS + S2_CHANNELS}


def _take(batch: dict[str, torch.Tensor], key: str, channels: int, method: str) -> torch.Tensor:
    """batch[key] checked to be (B, channels, H, W); a clear error instead of a conv shape error."""
    if key not in batch:
        raise SatfuseError(
            f"model.method={method}: the batch has no {key!r} (keys: {sorted(batch)}); "
            f"the loader must provide it for this method"
        )
    x = batch[key]
    if x.dim() != 4 or x.shape[1] != channels:
        raise SatfuseError(
            f"model.method={method}: batch[{key!r}] has shape {tuple(x.shape)}, expected "
            f"(B, {channels}, H, W); check the loader's bands (and model.simclr_input for SimCLR)"
        )
    return x


class PretrainModel(nn.Module, abc.ABC):
    """What a pretraining method provides. Subclass it and register the class::

        @METHODS.register("my_method")
        class MyMethod(PretrainModel):
            method = "my_method"
            ...

    The registered class is the builder: `cls(model_cfg, channels)`, plus `img_size=<crop>`
    when its `__init__` takes it (ViT/Swin backbones size themselves from the crop, passed on
    as `build_backbone(..., img_size=self.img_size)`); the loss is configured by
    `LossConfig` at `loss(...)`. `build_pretrain_model` adds SyncBatchNorm when asked.
    """

    method: ClassVar[str] = "base"
    """The registered name (`model.method`), used in messages, checkpoints and exports."""

    title: ClassVar[str] = ""
    """The name downstream tables print ("Dual-SimCLR"); empty: `method`."""

    inputs: ClassVar[tuple[str, ...]] = ("s1", "s2")
    """The batch keys `forward` reads. The loader always provides `s1` and `s2` (normalised,
    cropped); `view1`/`view2` are made only for a method with `views`."""

    views: ClassVar[bool] = False
    """True: the loader adds two augmented views `view1`, `view2` of `model.simclr_input` to each
    sample (`satfuse.data.reading.augment.simclr_views`); their random draws cost loader time, so only a
    method that reads them asks for them."""

    cross_modal: ClassVar[bool] = True
    """True when the model embeds the S1 and the S2 of a place separately, so held-out S1 -> S2
    retrieval (`train.eval_every`, the end-of-run score) is defined; False skips it, said once."""

    def __init__(self, cfg: ModelConfig, channels: dict[str, int] | None = None,
                 img_size: int | None = None) -> None:
        """Build from the `model` section; `channels`: input bands per sensor (the shard
        manifest's), the 13-band SEN12MS default where missing; `img_size`: the square crop
        the backbones see (None: unknown; backbones that need it refuse by name)."""
        super().__init__()
        self.cfg = cfg
        self.img_size = img_size
        # input bands per sensor, from the shard manifest (`satfuse.data.format.bands`); SEN12MS default
        self.channels_in = {"s1": S1_CHANNELS, "s2": S2_CHANNELS, **(channels or {})}

    @abc.abstractmethod
    def backbones(self) -> dict[str, nn.Module]:
        """The trunks exported for fine-tuning, by modality name ("s1", "s2"; "shared" for one
        trunk on one input): `satfuse ckpt export` writes exactly these."""

    def in_channels(self) -> dict[str, int]:
        """Input bands of each exported trunk, by the same names as `backbones()`."""
        return {name: int(m.in_channels) for name, m in self.backbones().items()}

    @abc.abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embeddings the loss needs, from the batch keys in `inputs`."""

    @staticmethod
    def heldout_pair(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(S1, S2) pooled embeddings of `forward`'s outputs, for held-out retrieval (only
        called when `cross_modal`); the default reads the projections `z_s1`, `z_s2`."""
        return outputs["z_s1"], outputs["z_s2"]

    def loss(
        self, outputs: dict[str, torch.Tensor], loss_cfg: LossConfig, metrics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over the GLOBAL batch and metrics as 0-d tensors on the device: reading
        one (`float(...)`) synchronises a GPU, so the trainer does it on log steps only.
        `metrics=False`: only {"loss"}; the in-batch retrieval accuracy costs three
        collectives (gather keys, gather mask, reduce hits), so it runs on log steps only."""

    def _check_sync_bn(self, x: torch.Tensor) -> None:
        """SyncBatchNorm is CUDA-only in torch; fail with the fix instead of deep in forward."""
        if (
            self.cfg.sync_bn
            and self.training
            and x.device.type == "cpu"
            and torch.distributed.is_initialized()
        ):
            raise SatfuseError(
                "model.sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on CPU/gloo); "
                "set model.sync_bn=false for CPU runs"
            )


def _pair_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, loss_cfg: LossConfig, metrics: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """nt_xent/infonce over the global batch plus (with `metrics`) the a->b top-1 retrieval
    accuracy (0-d tensors)."""
    loss = nt_xent(z_a, z_b, loss_cfg.temperature, loss_cfg.variant, loss_cfg.local_loss)
    out = {"loss": loss.detach()}
    if metrics:
        out["retrieval_top1"] = retrieval_accuracy_tensor(z_a, z_b)
    return loss, out


@METHODS.register("dual_simclr")
class DualSimCLR(PretrainModel):
    """One backbone + projection head per modality; S1 and S2 of the same place are positives.

    No augmentations (as the authors): the two modalities are the two views.
    """

    method, title = "dual_simclr", "Dual-SimCLR"

    def __init__(self, cfg: ModelConfig, channels: dict[str, int] | None = None,
                 img_size: int | None = None) -> None:
        super().__init__(cfg, channels, img_size)
        self.backbone_s1 = build_backbone(cfg.backbone, self.channels_in["s1"], img_size=img_size)
        self.backbone_s2 = build_backbone(cfg.backbone, self.channels_in["s2"], img_size=img_size)
        self.head_s1 = ProjectionHead(self.backbone_s1.out_dim, cfg.proj_hidden, cfg.proj_out)
        self.head_s2 = ProjectionHead(self.backbone_s2.out_dim, cfg.proj_hidden, cfg.proj_out)

    def backbones(self) -> dict[str, nn.Module]:
        return {"s1": self.backbone_s1, "s2": self.backbone_s2}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s1 = _take(batch, "s1", self.channels_in["s1"], self.method)
        s2 = _take(batch, "s2", self.channels_in["s2"], self.method)
        self._check_sync_bn(s1)
        return {
            "z_s1": self.head_s1(self.backbone_s1(s1)),
            "z_s2": self.head_s2(self.backbone_s2(s2)),
        }

    def loss(
        self, outputs: dict[str, torch.Tensor], loss_cfg: LossConfig, metrics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _pair_loss(outputs["z_s1"], outputs["z_s2"], loss_cfg, metrics)


@METHODS.register("simclr")
class SimCLR(PretrainModel):
    """One backbone + head on two augmented views (`view1`, `view2`, made by the loader with
    `satfuse.data.reading.augment.simclr_views`) of S2 RGB (authors), all 13 S2 bands, or S1+S2
    (`model.simclr_input`). retrieval_top1 here is view1 -> view2."""

    method, title = "simclr", "SimCLR"
    inputs = ("view1", "view2")
    views = True
    cross_modal = False  # one trunk on one input: there is no S1 -> S2 pair to retrieve

    def __init__(self, cfg: ModelConfig, channels: dict[str, int] | None = None,
                 img_size: int | None = None) -> None:
        super().__init__(cfg, channels, img_size)
        if cfg.simclr_input not in SIMCLR_CHANNELS:
            raise SatfuseError(
                f"model.simclr_input={cfg.simclr_input!r} is not one of {list(SIMCLR_CHANNELS)}"
            )
        c1, c2 = self.channels_in["s1"], self.channels_in["s2"]
        self.channels = {"s2_rgb": 3, "s2": c2, "s1s2": c1 + c2}[cfg.simclr_input]
        self.backbone = build_backbone(cfg.backbone, self.channels, img_size=img_size)
        self.head = ProjectionHead(self.backbone.out_dim, cfg.proj_hidden, cfg.proj_out)

    def backbones(self) -> dict[str, nn.Module]:
        return {"shared": self.backbone}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v1 = _take(batch, "view1", self.channels, self.method)
        v2 = _take(batch, "view2", self.channels, self.method)
        if v1.shape != v2.shape:
            raise SatfuseError(
                f"simclr: view1 {tuple(v1.shape)} and view2 {tuple(v2.shape)} differ; use one out_size"
            )
        self._check_sync_bn(v1)
        # One pass over both views: BatchNorm sees the same statistics for both.
        z = self.head(self.backbone(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        return {"z_view1": z1, "z_view2": z2}

    def loss(
        self, outputs: dict[str, torch.Tensor], loss_cfg: LossConfig, metrics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _pair_loss(outputs["z_view1"], outputs["z_view2"], loss_cfg, metrics)


@METHODS.register("mma")
class MMA(PretrainModel):
    """Multi-modal alignment (Windsor et al. 2021) of spatial feature maps.

    What is aligned: the last spatial feature map of each modality's backbone, projected at
    every location by a 1x1-conv head (out_dim -> proj_hidden -> mma_dim). The embedding at
    location (h, w) of S1 must match the S2 embedding at the same (h, w) of the same image,
    against all other locations of all images in the global batch
    (`satfuse.losses.dense_alignment_loss`). Why: S1 and S2 of SEN12MS are co-registered, so
    the same location is the same ground; aligning per location (not only pooled vectors)
    makes the features spatially specific, which is what dense downstream tasks need.
    Windsor et al. learn the alignment because their scans are not registered; here the
    grid correspondence is given. Backbones are our ResNets (the paper used VGG-style
    encoders); downstream uses their pooled features.
    """

    method, title = "mma", "MMA"

    def __init__(self, cfg: ModelConfig, channels: dict[str, int] | None = None,
                 img_size: int | None = None) -> None:
        super().__init__(cfg, channels, img_size)
        self.backbone_s1 = build_backbone(cfg.backbone, self.channels_in["s1"], img_size=img_size)
        self.backbone_s2 = build_backbone(cfg.backbone, self.channels_in["s2"], img_size=img_size)
        self.head_s1 = DenseProjectionHead(self.backbone_s1.out_dim, cfg.proj_hidden, cfg.mma_dim)
        self.head_s2 = DenseProjectionHead(self.backbone_s2.out_dim, cfg.proj_hidden, cfg.mma_dim)

    def backbones(self) -> dict[str, nn.Module]:
        return {"s1": self.backbone_s1, "s2": self.backbone_s2}

    @staticmethod
    def heldout_pair(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The aligned feature maps, pooled."""
        return outputs["f_s1"].mean(dim=(2, 3)), outputs["f_s2"].mean(dim=(2, 3))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s1 = _take(batch, "s1", self.channels_in["s1"], self.method)
        s2 = _take(batch, "s2", self.channels_in["s2"], self.method)
        if s1.shape[-2:] != s2.shape[-2:]:
            raise SatfuseError(
                f"mma: S1 {tuple(s1.shape[-2:])} and S2 {tuple(s2.shape[-2:])} crops differ; "
                "crop both modalities at the same place and size"
            )
        self._check_sync_bn(s1)
        f1 = self.head_s1(self.backbone_s1.forward_features(s1))
        f2 = self.head_s2(self.backbone_s2.forward_features(s2))
        return {"f_s1": f1, "f_s2": f2}

    def loss(
        self, outputs: dict[str, torch.Tensor], loss_cfg: LossConfig, metrics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f1, f2 = outputs["f_s1"], outputs["f_s2"]
        loss = dense_alignment_loss(
            f1, f2, loss_cfg.temperature, loss_cfg.variant, loss_cfg.local_loss
        )
        out = {"loss": loss.detach()}
        if metrics:
            out["retrieval_top1"] = retrieval_accuracy_tensor(f1.mean(dim=(2, 3)), f2.mean(dim=(2, 3)))
        return loss, out


def method_class(name: str) -> type[PretrainModel]:
    """The registered method `name`; an unknown name is refused listing every choice."""
    return METHODS.get(name)


def method_title(name: str) -> str:
    """The table name of the pretraining method `name` (a checkpoint's); an unregistered name as is."""
    return (METHODS.get(name).title or name) if name in METHODS else name


def build_pretrain_model(cfg: ModelConfig, channels: dict[str, int] | None = None,
                         img_size: int | None = None) -> PretrainModel:
    """The model for `cfg.method`; with `cfg.sync_bn` its BatchNorms become SyncBatchNorm
    (statistics over the global batch; CUDA only, the model refuses it on CPU at forward).

    `channels`: input bands per sensor ({"s1": 2, "s2": 12} ...), taken from the shard
    manifest by the trainer and from the checkpoint's normalization by the export; None =
    the 13-band SEN12MS default. `img_size`: the crop (`data.crop`), for backbones sized by it;
    it reaches only method classes whose `__init__` takes it (plugins written before it)."""
    cls = method_class(cfg.method)
    if "img_size" in inspect.signature(cls.__init__).parameters:
        model = cls(cfg, channels, img_size=img_size)
    else:
        model = cls(cfg, channels)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
