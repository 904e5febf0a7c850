"""The training clone of a ComfyUI MODEL: every change goes through ModelPatcher extension points.

* ``model_sampling`` object patch: a subclass of the model's own sampling whose ``calculate_denoised``
  returns the raw model output. For a CONST (flow) model that output IS the velocity v = eps - x0
  (NextDiT returns ``-x`` so that ``denoised = x - sigma * output``), so ``apply_model`` gives v
  exactly, with no division by sigma.
* ``<linear>.forward`` object patches: the LoRA branch (training/lora.py).
* ``layers.N.forward`` object patches: non-reentrant gradient checkpointing per block.
* ``<linear>.forward_comfy_cast_weights`` object patches: layers whose weight ComfyUI casts per call
  (fp8 or other storage dtypes, block-swapped layers) cast it again in backward instead of autograd
  saving the cast copy, and never multiply in fp8 (which autograd cannot differentiate).
* weight wrappers (identity): ComfyUI copies a weight before calling wrappers. Only added when the
  weights are inference tensors (a model loaded inside ComfyUI's executor runs under
  torch.inference_mode), which autograd cannot save for backward.

Object patches live only while the clone is loaded; ``release`` unloads it, restoring the modules.

Block swapping (``blocks_to_swap`` = N > 0): the last N main ``layers`` blocks stay on the offload
device and are streamed in module by module by ComfyUI's own low-VRAM casting (``comfy_cast_weights``),
in the forward pass and again in the checkpointed recomputation of backward. The clone is loaded
with a memory budget of the model minus those blocks (plus ComfyUI's streaming buffer), never in
full, and its ``_load_list`` ranks the swapped blocks' modules below all others: ComfyUI fills a
budget from the top of that order and frees from the bottom, so exactly those modules are streamed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from .lora import LoraAdapter, LoraForward
from .recast_linear import recast_linear

_VELOCITY_CLASSES: dict[type, type] = {}
_SWAP_CLASSES: dict[type, type] = {}
log = logging.getLogger("lumina_turbo.training")


def velocity_model_sampling(model_sampling):
    """A copy of ``model_sampling`` whose calculate_denoised returns the model output (the velocity)."""
    import comfy.model_sampling

    if not isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError(
            f"model: {type(model_sampling).__name__} is not a flow-matching (CONST) model; the trainer "
            "trains velocity models such as Lumina-Image-2.0 and Z-Image"
        )
    base = type(model_sampling)
    if base not in _VELOCITY_CLASSES:

        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

        _VELOCITY_CLASSES[base] = type(
            f"VelocityOutput{base.__name__}", (base,), {"calculate_denoised": calculate_denoised}
        )
    patched = copy.copy(model_sampling)
    patched.__class__ = _VELOCITY_CLASSES[base]
    return patched


class CheckpointedForward:
    """Object patch for ``<block>.forward``: recompute the block's activations during backward."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward
        if not torch.is_grad_enabled():
            return forward(self.module, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, self.module, *args, use_reentrant=False, **kwargs)


def writable_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: ComfyUI's cast makes a normal (non-inference) copy whenever a wrapper exists."""
    return weight


def has_inference_weights(module: torch.nn.Module) -> bool:
    return any(p.is_inference() for p in module.parameters())


def build_training_patcher(
    model,
    adapters: dict[str, LoraAdapter],
    *,
    compute_dtype: torch.dtype | None,
    gradient_checkpointing: bool,
):
    """A clone of ``model`` that predicts velocities and carries the LoRA adapters."""
    patcher = model.clone()
    diffusion_model = patcher.model.diffusion_model
    if compute_dtype is not None:
        patcher.set_model_compute_dtype(compute_dtype)
    patcher.add_object_patch(
        "model_sampling", velocity_model_sampling(patcher.get_model_object("model_sampling"))
    )
    for name, adapter in adapters.items():
        patcher.add_object_patch(
            f"diffusion_model.{name}.forward", LoraForward(diffusion_model.get_submodule(name), adapter)
        )
    if gradient_checkpointing:
        for prefix in ("layers", "noise_refiner", "context_refiner"):
            for index, block in enumerate(getattr(diffusion_model, prefix, [])):
                patcher.add_object_patch(
                    f"diffusion_model.{prefix}.{index}.forward", CheckpointedForward(block)
                )
    add_recast_patches(patcher)
    if has_inference_weights(diffusion_model):
        for name, module in diffusion_model.named_modules():
            if hasattr(module, "comfy_cast_weights") and getattr(module, "weight", None) is not None:
                patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", writable_weight)
    return patcher


class RecastForward:
    """Object patch for a frozen ComfyUI Linear's ``forward_comfy_cast_weights`` (what its forward runs
    whenever ComfyUI casts the weight: fp8 or another storage dtype, a block-swapped layer): ComfyUI's
    cast and product, re-cast in the backward pass instead of saved (training/recast_linear.py).

    Never multiplies in fp8: ComfyUI's fp8 matmul path (``fp8_e4m3fn_fast``, scaled-fp8 files on GPUs
    with fp8 compute) quantizes the activations with an in-place clamp that autograd refuses."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        if self.module.weight.requires_grad:  # only frozen weights may skip autograd
            return type(self.module).forward_comfy_cast_weights(self.module, input)
        scale = getattr(self.module, "scale_weight", None)
        # as ComfyUI's scaled-fp8 layer: scale whichever of input and weight is smaller
        scale_input = scale is not None and self.module.weight.numel() >= input.numel()
        if scale_input:
            input = input * scale.to(device=input.device, dtype=input.dtype)
        weight_scale = None if scale_input else scale
        return recast_linear(input, lambda dtype, device: self.cast(weight_scale, dtype, device))

    @contextlib.contextmanager
    def cast(self, weight_scale, dtype, device):
        import comfy.ops

        weight, bias, stream = comfy.ops.cast_bias_weight(
            self.module, dtype=dtype, device=device, bias_dtype=dtype, offloadable=True
        )
        try:
            if weight_scale is not None:
                yield weight * weight_scale.to(device=weight.device, dtype=weight.dtype), bias
            else:
                yield weight, bias
        finally:
            comfy.ops.uncast_bias_weight(self.module, weight, bias, stream)


def add_recast_patches(patcher) -> int:
    """Send every frozen ComfyUI Linear of the clone through :class:`RecastForward`; returns how many."""
    patched = 0
    for name, module in patcher.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "forward_comfy_cast_weights"):
            patcher.add_object_patch(
                f"diffusion_model.{name}.forward_comfy_cast_weights", RecastForward(module)
            )
            patched += 1
    return patched


def _patch_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _patch_tensors(item)]
    if hasattr(value, "weights"):  # comfy.weight_adapter adapters keep their tensors in .weights
        return _patch_tensors(value.weights)
    return []


def model_fingerprint(patcher) -> str:
    """Identity of the weights the LoRA trains on: the base weights (ComfyUI's shared backup holds them
    while a clone has patched them in place) plus the patches (LoRAs) of this MODEL."""
    from .cache import state_dict_fingerprint, tensor_sample_bytes

    prefix = "diffusion_model."
    base = {}
    for key, value in patcher.model.diffusion_model.state_dict().items():
        saved = patcher.backup.get(prefix + key)
        base[key] = saved.weight if saved is not None else value
    patches = []
    for key in sorted(patcher.patches):
        for entry in patcher.patches[key]:
            tensors = _patch_tensors(entry[1])
            digest = [tensor_sample_bytes(t).hex()[:64] for t in tensors]
            patches.append((key, float(entry[0]), float(entry[2]), [tuple(t.shape) for t in tensors], digest))
    return state_dict_fingerprint(base, patches)


class _RankedEntry(tuple):
    """One ``ModelPatcher._load_list`` entry (module_offload_mem, module_mem, name, module, params) that
    sorts by ``rank``: ComfyUI's ``load`` sorts these descending and keeps modules while its budget
    lasts; ``partially_unload`` sorts ascending and frees from the start."""

    rank: tuple

    def __lt__(self, other):
        return self.rank < other.rank


def _ranked(entry, swapped_prefixes: tuple[str, ...]) -> _RankedEntry:
    ranked = _RankedEntry(entry)
    name, module = entry[2], entry[3]
    swapped = name.startswith(swapped_prefixes) and hasattr(module, "comfy_cast_weights")
    ranked.rank = (not swapped, entry[0], entry[1], name)
    return ranked


def _block_swap_class(base: type) -> type:
    if base not in _SWAP_CLASSES:

        def _load_list(self, *args, **kwargs):
            entries = base._load_list(self, *args, **kwargs)
            return [_ranked(entry, self.swapped_prefixes) for entry in entries]

        _SWAP_CLASSES[base] = type(
            f"BlockSwap{base.__name__}", (base,), {"_load_list": _load_list, "swapped_prefixes": ()}
        )
    return _SWAP_CLASSES[base]


@dataclass
class SwapPlan:
    """What block swapping streams: the ``layers`` indices, their modules, and the load budget (bytes)."""

    blocks: list[int]
    modules: list[str]  # ModelPatcher module names (diffusion_model.layers.N....)
    streamed_bytes: int
    resident_bytes: int
    budget: int


def swapped_block_indices(diffusion_model, blocks_to_swap: int) -> list[int]:
    """The last ``blocks_to_swap`` main blocks (as AC-RF's ForwardBlockSwapper), all of them at most."""
    count = len(diffusion_model.layers)
    return list(range(max(0, count - blocks_to_swap), count))


def plan_block_swap(patcher, blocks_to_swap: int) -> SwapPlan:
    """Make ``patcher`` stream its last ``blocks_to_swap`` main blocks; returns what loading will do."""
    import comfy.model_management as mm

    blocks = swapped_block_indices(patcher.model.diffusion_model, blocks_to_swap)
    patcher.__class__ = _block_swap_class(type(patcher))
    patcher.swapped_prefixes = tuple(f"diffusion_model.layers.{index}." for index in blocks)
    entries = patcher._load_list()
    swapped = [entry for entry in entries if not entry.rank[0]]
    streamed = sum(entry[1] for entry in swapped)
    resident = sum(entry[1] for entry in entries if entry.rank[0])
    # ComfyUI keeps a module while loaded + its size + a streaming buffer of (NUM_STREAMS + 1) x the
    # module's size stays under the budget; this budget keeps every other module and no swapped one.
    buffer = max(entry[0] for entry in swapped) * (getattr(mm, "NUM_STREAMS", 0) + 1)
    budget = min(resident + buffer + 1, patcher.model_size())
    return SwapPlan(blocks, sorted(entry[2] for entry in swapped), streamed, resident, budget)


def streamed_modules(patcher) -> list[str]:
    """Modules ComfyUI left on the offload device to cast per use (not loaded regularly)."""
    return sorted(
        entry[2]
        for entry in patcher._load_list()
        if hasattr(entry[3], "comfy_cast_weights") and not getattr(entry[3], "comfy_patched_weights", False)
    )


def load_for_training(patcher, blocks_to_swap: int = 0) -> SwapPlan | None:
    """Load through ComfyUI's model management, in full, or without the swapped blocks (see the module doc)."""
    import comfy.model_management as mm

    if blocks_to_swap <= 0:
        # Training needs the activations' memory too: like TrainLoraNode, free everything else first.
        mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        patcher.model.diffusion_model.requires_grad_(False)
        return None
    plan = plan_block_swap(patcher, blocks_to_swap)
    # What load_models_gpu does before loading (other models, clones of these weights included, are
    # unloaded), then ComfyUI's own partial load with our budget instead of one from the free memory.
    mm.free_memory(1e30, patcher.load_device)
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(plan.budget)
    mm.current_loaded_models.insert(0, loaded)
    patcher.model.diffusion_model.requires_grad_(False)
    streamed = streamed_modules(patcher)
    if streamed != plan.modules:
        log.warning(
            "lumina_turbo: blocks_to_swap: ComfyUI streams %d modules (%s...) instead of the %d of layers %s",
            len(streamed),
            ", ".join(streamed[:3]),
            len(plan.modules),
            plan.blocks,
        )
    log.info(
        "lumina_turbo: blocks_to_swap = %d: layers %s streamed (%.1f MB), %.1f MB resident",
        blocks_to_swap,
        plan.blocks,
        plan.streamed_bytes / 2**20,
        plan.resident_bytes / 2**20,
    )
    return plan


def release(patcher) -> None:
    """Unload the training clone: its object patches (LoRA forwards, checkpointing) leave the shared modules."""
    import comfy.model_management as mm

    for index in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[index]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
    if patcher.object_patches_backup:
        patcher.unpatch_model(patcher.offload_device)
    for module in patcher.model.diffusion_model.modules():
        functions = getattr(module, "weight_function", None)
        if functions and writable_weight in functions:
            module.weight_function = [f for f in functions if f is not writable_weight]
