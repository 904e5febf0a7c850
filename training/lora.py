"""LoRA adapters for NextDiT (Lumina-2 / Z-Image): which layers, how they are initialised, their keys.

Targets (module names inside ``diffusion_model``, all nn.Linear):
  * default: attention ``qkv`` and ``out`` and feed-forward ``w1``, ``w2``, ``w3`` of the main
    ``layers.N`` blocks - what the AC-RF trainer and musubi train;
  * opt-in: the same in ``noise_refiner.N`` / ``context_refiner.N`` (``train_refiners``) and the
    ``adaLN_modulation`` Linear (``train_adaln``; index 0 in Z-Image, 1 in Lumina-2).
Norms, biases, embedders and the final layer are never trained (ComfyUI's TrainLoraNode trains all).

Initialisation: down ~ kaiming_uniform(a=sqrt(5)) from the run's seed, up = 0, so the adapted model
starts exactly at the base model. The update is W + (alpha / rank) up @ down on the *fused* qkv (one
rank-r LoRA on the fused weight), so the saved ``alpha`` is the network alpha as is - ComfyUI divides
it by the rank of ``lora_down`` (= r).

Saved keys are ComfyUI-native (``diffusion_model.layers.N.attention.qkv.lora_up.weight``,
``.lora_down.weight``, ``.alpha``): the stock LoraLoader maps them with its generic key map.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

_BLOCK = r"(?:layers|noise_refiner|context_refiner)\.\d+"
_ATTENTION = re.compile(rf"^{_BLOCK}\.attention\.(?:qkv|out)$")
_FFN = re.compile(rf"^{_BLOCK}\.feed_forward\.w[123]$")
_ADALN = re.compile(rf"^{_BLOCK}\.adaLN_modulation\.\d+$")
_REFINER = re.compile(r"^(?:noise_refiner|context_refiner)\.")
KEY_PREFIX = "diffusion_model."


def select_targets(
    diffusion_model: torch.nn.Module,
    *,
    attention: bool = True,
    ffn: bool = True,
    adaln: bool = False,
    refiners: bool = False,
) -> list[str]:
    """Names (inside ``diffusion_model``) of the Linear layers that get a LoRA, in module order."""
    names = []
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if _REFINER.match(name) and not refiners:
            continue
        if (
            (attention and _ATTENTION.match(name))
            or (ffn and _FFN.match(name))
            or (adaln and _ADALN.match(name))
        ):
            names.append(name)
    if not names:
        raise ValueError("no LoRA target found: is this a Lumina-2 / Z-Image (NextDiT) model?")
    return names


class LoraAdapter(torch.nn.Module):
    """delta(x) = (alpha / rank) * up(down(x)); parameters stay float32 (the optimizer's master copy)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.lora_down = torch.nn.Parameter(torch.zeros(rank, in_features))
        self.lora_up = torch.nn.Parameter(torch.zeros(out_features, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            torch.nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5), generator=generator)
            self.lora_up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.lora_down.to(x.dtype))
        return F.linear(hidden, self.lora_up.to(x.dtype)) * self.scale


def create_adapters(
    diffusion_model: torch.nn.Module, names: list[str], rank: int, alpha: float, seed: int
) -> dict[str, LoraAdapter]:
    """One adapter per target, initialised from ``seed`` in ``names`` order (deterministic)."""
    generator = torch.Generator().manual_seed(int(seed))
    adapters = {}
    for name in names:
        module = diffusion_model.get_submodule(name)
        adapter = LoraAdapter(module.in_features, module.out_features, rank, alpha)
        adapter.reset(generator)
        adapters[name] = adapter
    return adapters


class LoraForward:
    """Object patch for ``<linear>.forward``: the layer's own forward (ComfyUI casts, patches, offload)
    plus the low-rank branch computed on the activations (no full-size weight gradient)."""

    def __init__(self, module: torch.nn.Module, adapter: LoraAdapter):
        self.module, self.adapter = module, adapter

    def __call__(self, x, *args, **kwargs):
        out = type(self.module).forward(self.module, x, *args, **kwargs)
        return out + self.adapter(x).to(out.dtype)


def lora_state_dict(
    adapters: dict[str, LoraAdapter], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """ComfyUI-native LoRA tensors on the CPU: ``diffusion_model.<name>.lora_up/.lora_down.weight`` + ``.alpha``."""
    state = {}
    for name, adapter in adapters.items():
        stem = KEY_PREFIX + name
        state[f"{stem}.lora_up.weight"] = adapter.lora_up.detach().to("cpu", dtype).clone()
        state[f"{stem}.lora_down.weight"] = adapter.lora_down.detach().to("cpu", dtype).clone()
        state[f"{stem}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return state


def load_lora_state(adapters: dict[str, LoraAdapter], state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`lora_state_dict` back into the adapters (exact resume); shapes and alpha must match."""
    expected = set(lora_state_dict_keys(adapters))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(
            f"checkpoint LoRA does not match this run's targets (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, adapter in adapters.items():
            stem = KEY_PREFIX + name
            if float(state[f"{stem}.alpha"]) != adapter.alpha:
                raise ValueError(f"checkpoint LoRA alpha {float(state[f'{stem}.alpha'])} != {adapter.alpha}")
            adapter.lora_up.copy_(state[f"{stem}.lora_up.weight"])
            adapter.lora_down.copy_(state[f"{stem}.lora_down.weight"])


def lora_state_dict_keys(adapters) -> list[str]:
    return [f"{KEY_PREFIX}{n}.{s}" for n in adapters for s in ("lora_up.weight", "lora_down.weight", "alpha")]


class TrainedLora(dict):
    """A LORA_MODEL: ComfyUI's plain dict of native-key tensors (LoraModelLoader / SaveLoRA accept it),
    carrying the training metadata that LTSaveLora writes into the file header."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
