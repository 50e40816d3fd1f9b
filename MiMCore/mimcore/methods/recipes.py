"""Each method's published optimisation and data recipe (METHODS.md / METHODS.md sections 1-3).

These are the defaults of ``mim pretrain --method M`` and the numbers the recipe files in
``Training/configs`` must carry (a test reads both). Torch-free: the CLI's parser reads
this table.

Learning rate and batch: ``lr`` is the published peak learning rate at ``effective_batch``
crops per optimizer step. Where the published code scales the learning rate with the
batch (``lr_batch`` set: MiM), a run with another number of crops per step uses
``lr x crops / lr_batch``; where it does not (MAE, SimMIM, GMIM), ``lr`` is used as is.

Schedule: linear warm-up from 0, then a cosine from ``lr`` down to the floor ``min_lr``
(``min_lr = lr`` keeps the rate constant after warm-up, as SimMIM's published config does).
"""

from __future__ import annotations

from dataclasses import dataclass

from mimcore.errors import MimError


@dataclass(frozen=True)
class Recipe:
    """A method's published pre-training recipe.

    lr: peak learning rate at ``effective_batch`` crops per step.
    lr_batch: crops per step ``lr`` belongs to when it is scaled linearly with the batch;
        None: not scaled (the published code uses ``lr`` at any batch).
    effective_batch: crops per optimizer step of the published run.
    crops_per_volume: consecutive crops cut from one volume (4 volumes x 4 crops = 16).
    weight_decay, betas: AdamW.
    decay_exempt: parameter-name parts that get no weight decay, beyond biases and every
        parameter of one dimension (norms), which never do.
    warmup_epochs / warmup_steps: linear warm-up length (one of them); a run of another
        length warms up for the same fraction of its steps (:attr:`warmup_fraction`).
    epochs / steps: the published length (the one the warm-up is given in).
    min_lr: floor of the cosine.
    hu_window, spacing, crop_foreground: the data (spacing None: no resampling;
        crop_foreground: MONAI ``CropForegroundd`` on the windowed image before cropping).
    source: where the numbers were read.
    """

    lr: float
    lr_batch: int | None
    effective_batch: int
    weight_decay: float
    betas: tuple[float, float]
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    epochs: float | None = None
    steps: int | None = None
    min_lr: float = 0.0
    crops_per_volume: int = 1
    decay_exempt: tuple[str, ...] = ()
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    source: str = ""

    @property
    def warmup_fraction(self) -> float:
        """The published warm-up as a fraction of the published run (MiM 40/800 epochs)."""
        if self.warmup_steps is not None:
            return self.warmup_steps / self.steps
        return self.warmup_epochs / self.epochs

    def lr_for(self, crops_per_step: int) -> float:
        """The peak learning rate for ``crops_per_step`` crops per optimizer step."""
        return self.lr * crops_per_step / self.lr_batch if self.lr_batch else self.lr

    def lr_rule(self, name: str, crops_per_step: int) -> str:
        """One sentence that says how the learning rate was chosen."""
        lr = self.lr_for(crops_per_step)
        if self.lr_batch:
            if crops_per_step == self.lr_batch:
                return f"lr {lr:.3g}: {name}'s published lr at its {self.lr_batch} crops per step"
            hint = "; for a short run give --lr (make demo uses 3e-4)" if crops_per_step < self.lr_batch else ""
            return (f"lr {lr:.3g} = {self.lr:g} x {crops_per_step} crops per step / {self.lr_batch} "
                    f"({name}'s published lr at {self.lr_batch} crops per step, scaled linearly{hint})")
        return (f"lr {lr:.3g}: {name}'s published lr, used as published at any batch "
                f"(published: {self.effective_batch} crops per step)")


#: Key names of the position embeddings and mask tokens of MONAI's ViT and the MAE/SimMIM heads.
_TOKEN_NAMES = ("pos_embed", "position_embeddings", "mask_token")

RECIPES: dict[str, Recipe] = {
    # Released pretrain.sh: 1 crop per GPU x accumulation 64 x 2 GPUs = 128 crops per step;
    # its lr formula 1e-4 x (1 x 64 x 2 x 4) / 256 multiplies in an unused sw_batch_size 4, so
    # lr = 2e-4 at 128 crops. timm's add_weight_decay: only biases and 1-D parameters are
    # exempt (the decoder's mask token is decayed; the sin-cos position embeddings are fixed).
    "mim": Recipe(lr=2e-4, lr_batch=128, effective_batch=128, weight_decay=0.05, betas=(0.9, 0.95),
                  warmup_epochs=40, epochs=800, min_lr=0.0,
                  source="MiM released code: Pretrain/nscripts_gpu6/MiM/pretrain.sh and its main script"),
    # MIM-Med3D code/configs/ssl/btcv/*mae*.yaml: AdamW lr 3e-4 (not scaled), wd 0.05, default
    # betas, 300 warm-up epochs of 3,000, cosine with eta_min 1e-4; 4 volumes x 4 crops.
    "mae": Recipe(lr=3e-4, lr_batch=None, effective_batch=16, crops_per_volume=4, weight_decay=0.05,
                  betas=(0.9, 0.999), warmup_epochs=300, epochs=3000, min_lr=1e-4, decay_exempt=_TOKEN_NAMES,
                  hu_window=(-175.0, 250.0), spacing=(1.5, 1.5, 2.0), crop_foreground=True,
                  source="MIM-Med3D code/configs/ssl/btcv (ViT-B/16 MAE)"),
    # MIM-Med3D code/configs/ssl/btcv/*simmim*.yaml: lr 1e-4, wd 1e-5, 50 warm-up epochs of
    # 1,000, eta_min 1e-4 (= the peak: constant after warm-up).
    "simmim": Recipe(lr=1e-4, lr_batch=None, effective_batch=16, crops_per_volume=4, weight_decay=1e-5,
                     betas=(0.9, 0.999), warmup_epochs=50, epochs=1000, min_lr=1e-4, decay_exempt=_TOKEN_NAMES,
                     hu_window=(-175.0, 250.0), spacing=(1.5, 1.5, 2.0), crop_foreground=True,
                     source="MIM-Med3D code/configs/ssl/btcv (ViT-B/16 SimMIM)"),
    # GMIM's README command: AdamW lr 4e-4, weight decay 1e-5 (the code's default is 0.1),
    # 500 warm-up steps then cosine, 4,000 steps at batch 2 (regions).
    "gmim": Recipe(lr=4e-4, lr_batch=None, effective_batch=2, weight_decay=1e-5, betas=(0.9, 0.999),
                   warmup_steps=500, steps=4000, min_lr=0.0, decay_exempt=_TOKEN_NAMES,
                   source="GMIM published README command and main script"),
}


def recipe(method: str) -> Recipe:
    """The :class:`Recipe` of ``method``; MimError for an unknown one."""
    try:
        return RECIPES[method]
    except KeyError:
        raise MimError(f"no published recipe for method {method!r}; known: {', '.join(RECIPES)}") from None
