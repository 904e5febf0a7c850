"""A teacher-student problem on a real architecture: what a LoRA trainer learns, measured against a known target.

Base B: a (tiny) model. Teacher T: B + a known LoRA delta on the layers the trainer targets (attention
qkv/out and FFN of the main layers). Training data: T's own samples (latents, several captions, one
noise seed each), fed through the trainer's LATENT path; held out: T's samples from other seeds.
A student = B + the LoRA being trained. Metrics, each as the fraction of the B->T gap closed
(B = 0, T = 1):

* held-out velocity loss at the sampling anchors: MSE of v(x_sigma) against T's velocity at the same
  x_sigma (held-out latents, fixed noises). Not against eps - x0: a random-weight T is not the
  minimiser of the flow-matching loss on its own samples (a student can beat T there), so that loss
  is only recorded ('flow_loss');
* few-step fidelity: the student's N-step Euler sample on the anchor schedule vs the teacher's, same
  noise and caption, 1 - |S - T| / |B - T| (N = 4, 8, 30).

Time convention: ComfyUI sigma (1 = noise, 0 = data), x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0.
Dev-only: used by benchmarks/bench_training_quality.py and the trainer's slow test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..samplers.schedules import anchor_sigmas
from ..training.latent_dataset import LatentData, build_from_latents

CAPTIONS = (
    "a photo of a red cat",
    "a photo of a blue dog",
    "a photo of a green tree",
    "a photo of a white house",
)
SHIFT = 3.0
EVAL_STEPS = (4, 8, 30)
TEACHER_STEPS = 30  # T's data and held-out samples: 30 Euler steps on the anchor schedule


def model_velocity(base_model, x, sigma, cond):
    """v = eps - x0 predicted by a ComfyUI BaseModel (also while the trainer holds it: its velocity patch)."""
    out = base_model.apply_model(x, sigma, c_crossattn=cond, num_tokens=cond.shape[1])
    if type(base_model.model_sampling).__name__.startswith("VelocityOutput"):
        return out  # the trainer's model_sampling patch returns the velocity itself
    return (x - out) / sigma.view(-1, 1, 1, 1)


def teacher_lora(diffusion_model, *, rank: int = 4, scale: float = 1.0, seed: int = 1234) -> dict:
    """A known LoRA (ComfyUI-native keys) on the trainer's default targets: up and down ~ N(0, 1/fan_in),
    times ``scale`` on up; deterministic in ``seed``."""
    from ..training import lora

    names = lora.select_targets(diffusion_model, attention=True, ffn=True, adaln=False, refiners=False)
    adapters = lora.create_adapters(diffusion_model, names, rank, float(rank), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            down, up = adapter.lora_down, adapter.lora_up
            down.copy_(torch.randn(down.shape, generator=generator) / down.shape[1] ** 0.5)
            up.copy_(scale * torch.randn(up.shape, generator=generator) / up.shape[1] ** 0.5)
    return lora.lora_state_dict(adapters)


def with_lora(model, tensors: dict, strength: float = 1.0):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0)
    return patched


@torch.no_grad()
def euler(base_model, noise, sigmas, cond) -> torch.Tensor:
    """Euler along ``sigmas`` from ``noise`` [B, C, h, w] (model space); ``cond`` [B, L, D]."""
    x = noise.clone()
    for sigma, next_sigma in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        s = torch.full((x.shape[0],), sigma)
        x = x + (next_sigma - sigma) * model_velocity(base_model, x, s, cond)
    return x


@dataclass
class Problem:
    family: str
    base: object  # ComfyUI MODEL (B)
    teacher: object  # B + teacher LoRA (T)
    teacher_tensors: dict
    train: object  # CachedDataset of T's samples
    heldout_x0: torch.Tensor  # [K, C, h, w] model space
    heldout_cond: torch.Tensor  # [K, L, D]
    heldout_noise: torch.Tensor  # [K, C, h, w] the sampling noise of the fidelity metric
    loss_noise: torch.Tensor  # [draws, K, C, h, w] the noises of the held-out loss
    anchors: torch.Tensor  # the 8 sampling anchors (sigma > 0)
    teacher_v: torch.Tensor | None = None  # T's velocities at the held-out x_sigma
    reference: dict = field(default_factory=dict)  # B's and T's raw metrics


def _encode_captions(clip, captions) -> torch.Tensor:
    from ..training.cache import encode_prompt

    conds = [encode_prompt(clip, c)["cond"] for c in captions]
    if len({c.shape for c in conds}) != 1:
        raise ValueError("teacher_student: the captions must encode to equal lengths (batched evaluation)")
    return torch.stack(conds)


def make_problem(
    model,
    clip,
    cache_root,
    *,
    family: str = "zimage",
    latent_size: int = 16,
    train_seeds: int = 6,
    heldout_seeds: int = 1,
    teacher_rank: int = 4,
    teacher_scale: float = 1.0,
    teacher_tensors: dict | None = None,
    channels: int = 16,
    loss_draws: int = 2,
) -> Problem:
    """B, T, T's training samples (``train_seeds`` per caption) and held-out samples (other seeds)."""
    diffusion_model = model.model.diffusion_model
    tensors = teacher_tensors or teacher_lora(diffusion_model, rank=teacher_rank, scale=teacher_scale)
    teacher = with_lora(model, tensors)
    import comfy.model_management as mm

    mm.load_models_gpu([teacher])
    conds = _encode_captions(clip, CAPTIONS)
    generator = torch.Generator().manual_seed(20260)
    seeds = train_seeds + heldout_seeds
    noise = torch.randn(seeds, len(CAPTIONS), channels, latent_size, latent_size, generator=generator)
    schedule = anchor_sigmas(TEACHER_STEPS, SHIFT)
    samples = torch.stack([euler(teacher.model, noise[s], schedule, conds) for s in range(seeds)])
    raw = teacher.model.process_latent_out(samples[:train_seeds].flatten(0, 1))
    data = LatentData(list(raw), list(CAPTIONS) * train_seeds)
    train = build_from_latents(data, clip=clip, cache_root=cache_root)
    heldout_x0 = samples[train_seeds:].flatten(0, 1)
    heldout_cond = conds.repeat(heldout_seeds, 1, 1)
    problem = Problem(
        family=family,
        base=model,
        teacher=teacher,
        teacher_tensors=tensors,
        train=train,
        heldout_x0=heldout_x0,
        heldout_cond=heldout_cond,
        heldout_noise=torch.randn(heldout_x0.shape, generator=generator),
        loss_noise=torch.randn((loss_draws, *heldout_x0.shape), generator=generator),
        anchors=anchor_sigmas(8, SHIFT)[:-1],
    )
    problem.teacher_v = teacher_velocities(problem, teacher.model)
    teacher_raw = raw_metrics(problem, teacher.model)
    mm.load_models_gpu([model])
    base_raw = raw_metrics(problem, model.model)
    problem.reference = {"base": base_raw, "teacher": teacher_raw}
    return problem


def _noisy(problem: Problem):
    """(draw, anchor index, sigma, x_sigma, noise) of the held-out loss: every fixed noise at every anchor."""
    x0 = problem.heldout_x0
    for draw, noise in enumerate(problem.loss_noise):
        for index, sigma in enumerate(problem.anchors.tolist()):
            yield draw, index, sigma, (1 - sigma) * x0 + sigma * noise, noise


@torch.no_grad()
def teacher_velocities(problem: Problem, base_model) -> torch.Tensor:
    """T's velocity at every held-out x_sigma [draws, anchors, K, C, h, w] (the distillation target)."""
    out = torch.zeros((*problem.loss_noise.shape[:1], len(problem.anchors), *problem.heldout_x0.shape))
    for draw, index, sigma, x, _ in _noisy(problem):
        s = torch.full((x.shape[0],), sigma)
        out[draw, index] = model_velocity(base_model, x, s, problem.heldout_cond).float()
    return out


@torch.no_grad()
def heldout_losses(problem: Problem, base_model) -> dict[str, float]:
    """Held-out velocity MSE at the 8 anchors: against T's velocity ('loss', T = 0) and against the data's
    eps - x0 ('flow_loss', what the trainer minimises; a random T is not its minimiser)."""
    to_teacher = flow = 0.0
    count = 0
    for draw, index, sigma, x, noise in _noisy(problem):
        s = torch.full((x.shape[0],), sigma)
        v = model_velocity(base_model, x, s, problem.heldout_cond).float()
        to_teacher += float(((v - problem.teacher_v[draw, index]) ** 2).mean())
        flow += float(((v - (noise - problem.heldout_x0)) ** 2).mean())
        count += 1
    return {"loss": to_teacher / count, "flow_loss": flow / count}


@torch.no_grad()
def samples(problem: Problem, base_model, steps=EVAL_STEPS) -> dict[int, torch.Tensor]:
    return {
        n: euler(base_model, problem.heldout_noise, anchor_sigmas(n, SHIFT), problem.heldout_cond)
        for n in steps
    }


def raw_metrics(problem: Problem, base_model, steps=EVAL_STEPS) -> dict:
    """{'loss': held-out loss, 'samples': {N: [K, C, h, w]}} of a model (B, T or a student)."""
    return {**heldout_losses(problem, base_model), "samples": samples(problem, base_model, steps)}


def gap_closed(problem: Problem, measured: dict) -> dict:
    """Fractions of the B->T gap closed: {'loss': ..., 'fidelity_4': ..., ...} (1 = the teacher)."""
    base, teacher = problem.reference["base"], problem.reference["teacher"]
    out = {"loss": (base["loss"] - measured["loss"]) / (base["loss"] - teacher["loss"])}
    for n, sample in measured["samples"].items():
        target = teacher["samples"][n]
        base_distance = (base["samples"][n] - target).flatten(1).norm(dim=1)
        out[f"fidelity_{n}"] = float(1 - ((sample - target).flatten(1).norm(dim=1) / base_distance).mean())
    return out


def evaluate(problem: Problem, base_model, steps=EVAL_STEPS) -> dict:
    """Gap closed by ``base_model`` (the BaseModel of a MODEL, loaded; or a model being trained)."""
    return gap_closed(problem, raw_metrics(problem, base_model, steps))


def describe(problem: Problem) -> dict:
    """Sizes of the gap for the record: B's and T's loss, the B->T sample distance relative to T's norm."""
    base, teacher = problem.reference["base"], problem.reference["teacher"]
    relative = {
        str(n): round(
            float(
                (
                    (base["samples"][n] - teacher["samples"][n]).flatten(1).norm(dim=1)
                    / teacher["samples"][n].flatten(1).norm(dim=1)
                ).mean()
            ),
            4,
        )
        for n in teacher["samples"]
    }
    return {
        "family": problem.family,
        "train_items": len(problem.train),
        "captions": list(CAPTIONS),
        "heldout_items": int(problem.heldout_x0.shape[0]),
        "base_velocity_error": round(base["loss"], 5),
        "base_flow_loss": round(base["flow_loss"], 5),
        "teacher_flow_loss": round(teacher["flow_loss"], 5),
        "base_to_teacher_sample_distance_relative": relative,
    }


def save_problem(problem: Problem, path) -> None:
    """Everything but the models: a benchmark builds the problem once and its workers load it."""
    import json

    import safetensors.torch

    tensors = {f"teacher/{k}": v for k, v in problem.teacher_tensors.items()}
    tensors["train/latents"] = torch.stack([problem.train.latent(i) for i in range(len(problem.train))])
    for name in ("heldout_x0", "heldout_cond", "heldout_noise", "loss_noise", "anchors", "teacher_v"):
        tensors[name] = getattr(problem, name)
    for who, raw in problem.reference.items():
        for n, sample in raw["samples"].items():
            tensors[f"reference/{who}/{n}"] = sample
    meta = {
        "family": problem.family,
        "captions": [item.caption for item in problem.train.items],
        "loss": {who: [raw["loss"], raw["flow_loss"]] for who, raw in problem.reference.items()},
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"problem": json.dumps(meta)})


def load_problem(path, model, clip, cache_root) -> Problem:
    """A saved problem on ``model`` (the same B it was made with) and ``clip``."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["problem"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    teacher_tensors = {k[len("teacher/") :]: v for k, v in tensors.items() if k.startswith("teacher/")}
    data = LatentData(list(tensors["train/latents"]), meta["captions"])
    reference = {}
    for who, loss in meta["loss"].items():
        prefix = f"reference/{who}/"
        found = {int(k[len(prefix) :]): v for k, v in tensors.items() if k.startswith(prefix)}
        reference[who] = {"loss": loss[0], "flow_loss": loss[1], "samples": dict(sorted(found.items()))}
    return Problem(
        family=meta["family"],
        base=model,
        teacher=with_lora(model, teacher_tensors),
        teacher_tensors=teacher_tensors,
        train=build_from_latents(data, clip=clip, cache_root=cache_root),
        heldout_x0=tensors["heldout_x0"],
        heldout_cond=tensors["heldout_cond"],
        heldout_noise=tensors["heldout_noise"],
        loss_noise=tensors["loss_noise"],
        anchors=tensors["anchors"],
        teacher_v=tensors["teacher_v"],
        reference=reference,
    )
