"""Kind `vqvae-decoder`: fine-tunes a trained VQVAE's decoder (and post-quant conv) with its tokens frozen.

    varbench train vqvae-decoder --vqvae variants/zoo/vqvae.pt --out runs/vqvae_dec --steps 1500

The encoder, quant conv and quantizer (codebook, φ convs, hit statistic) are frozen and stay bit-identical, so
every image keeps its token pyramid and every VAR/HMAR trained on that tokenizer stays valid: VAR reads only
the codebook and φ convs (`VQVAE.tokens_to_var_input`), never the decoder. What the decoder sees is the
inference path's latent, f_hat of the frozen tokens (`VQVAE.tokens_to_fhat`), not the training pass's
straight-through one, so it learns to undo exactly the quantisation error that sampling produces.

Loss (no perceptual network is available offline): L1 + MSE + EDGE_WEIGHT · L1 of the horizontal and vertical
finite differences (sharp shape edges and stripes), all on [-1, 1] images without the inference clamp (a clamp
would stop the gradient of saturated pixels).

On the synthetic set the latents of all training images are computed once up front (the encoder is frozen);
a `--data` folder is encoded batch by batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import FolderData, MemoryData
from .progress import bar

if TYPE_CHECKING:
    from varbench.variants.vqvae import VQVAE

    from .tasks import Task
    from .trainer import TrainConfig

__all__ = ["DECODER_KIND", "TRAINED_PREFIXES", "EDGE_WEIGHT", "decoder_loss", "frozen_sha256", "decoder_task"]

DECODER_KIND = "vqvae-decoder"
TRAINED_PREFIXES = ("decoder.", "post_quant_conv.")  # everything else of the VQVAE is frozen
EDGE_WEIGHT = 1.0


def frozen_sha256(vae: nn.Module) -> str:
    """sha256 over the names and bytes of every tensor that decides the tokens (all but the decoder path)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if not name.startswith(TRAINED_PREFIXES):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _edges(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def decoder_loss(vae: VQVAE, f_hat: Tensor, images: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Loss of decoding frozen latents f_hat (B, Cvae, h, w) to `images` (B, 3, H, W) in [-1, 1]."""
    recon = vae.decoder(vae.post_quant_conv(f_hat))
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    (rx, ry), (ix, iy) = _edges(recon), _edges(images)
    edge = 0.5 * (F.l1_loss(rx, ix) + F.l1_loss(ry, iy))
    loss = l1 + mse + EDGE_WEIGHT * edge
    return loss, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item()}


def _freeze_tokens_(vae: nn.Module) -> list[str]:
    """Marks only the decoder path trainable; returns the trained parameter names."""
    trained = []
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_PREFIXES))
        if p.requires_grad:
            trained.append(name)
    return trained


def decoder_task(cfg: TrainConfig, vae: VQVAE, data: MemoryData | FolderData, data_info: dict[str, Any],
                 device: torch.device, progress: bool) -> Task:
    """The Task of kind `vqvae-decoder` on `vae` (the loaded `cfg.vqvae`, on `device`)."""
    from . import steps as T
    from .tasks import Task

    from varbench.variants.presets import sizes as preset_sizes

    pn = preset_sizes(cfg.preset).patch_nums
    trained = _freeze_tokens_(vae)
    digest = frozen_sha256(vae)

    @torch.no_grad()
    def latents(images: Tensor) -> Tensor:  # uint8 (B, H, W, 3) -> f_hat of its frozen tokens
        return vae.tokens_to_fhat(vae.encode_tokens(T.images_to_tensor(images.to(device)), pn), pn)

    def precompute(images: Tensor, split: str) -> Tensor:
        out = torch.empty(len(images), vae.cfg.z_channels, pn[-1], pn[-1])
        with bar(len(images), f"encode {split} images (frozen tokens)", "img", progress) as shown:
            for lo in range(0, len(images), 128):
                sl = slice(lo, min(len(images), lo + 128))
                out[sl] = latents(images[sl]).cpu()
                shown.update(sl.stop - sl.start)
        return out

    if isinstance(data, MemoryData):  # samples are latents, "labels" the images they must decode to
        data = MemoryData(precompute(data.x, "training"), data.x, precompute(data.held_x, "held-out"),
                          data.held_x, data.indices, data.rank, data.world)

        def pairs(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
            return x.to(device), T.images_to_tensor(target.to(device))
    else:
        def pairs(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
            return latents(x), T.images_to_tensor(x.to(device))

    def heldout() -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in data.heldout(128):
            yield pairs(x, y)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if frozen_sha256(vae) != digest:  # a bug, never a result: the tokens would have changed
            raise RuntimeError("the VQVAE's token path changed during decoder fine-tuning")
        vae.eval()
        err, count = torch.zeros((), dtype=torch.float64), 0
        for f_hat, images in heldout():
            recon = vae.decode(f_hat)  # the inference path, clamp included
            err += (recon - images).square().mean(dim=(1, 2, 3)).sum().double().cpu()
            count += len(images)
        vae.train()
        if not count:
            return {}
        mse = err.item() / count
        return {"heldout_mse": mse, "heldout_psnr": 10 * math.log10(4 / mse)}

    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]] = decoder_loss
    info = {"vqvae": cfg.vqvae, "frozen_sha256": digest, "trained": f"{len(trained)} tensors: "
            + ", ".join(TRAINED_PREFIXES), "loss": f"l1 + mse + {EDGE_WEIGHT}·edge_l1", "patch_nums": list(pn),
            "vqvae_config": asdict(vae.cfg),
            **data_info}
    return Task(vae, loss_fn, lambda x, y, step: pairs(x, y), evaluate, info, data)
