"""The training loop shared by LTLoraTrainer and the command line.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Micro-batch ``m`` (counted over the
whole run) is batch ``m mod n`` of epoch ``m div n`` of the dataset's bucketed order, so the data needs
no saved state; every random draw (sigmas, anchors, jitter, noise, caption dropout, replay) comes from
the trainer's own CPU ``torch.Generator``, whose state is checkpointed. Hence an interrupted run resumes
bit-exactly on the same device.

Several processes (training/distributed.py) train one global micro-batch of batch_size x world_size
items: every rank plans all of it with an equal generator, trains its contiguous share, and the LoRA
gradients are summed once per optimizer step; so N processes x batch b follow 1 process x batch N*b.

Each sample trains against its own caption: a micro-batch is split into groups of equal latent size
and caption length, and each group is one forward pass of exactly those samples (ComfyUI's
TrainLoraNode instead evaluates every caption on every latent and averages, for batch > 1).

Loss (per sample, velocity space, ComfyUI sigma 1 = noise):
    L_b = w_b * flow_loss_b + curvature_weight * curvature_b,   w_b = Min-SNR weight (1 when off)
objective = mean_b L_b (reduce_loss), divided by the accumulation count. The replay buffer ranks
samples by the unweighted flow_loss_b: the Min-SNR weight alone would make "hardest" mean "the sigma
with the largest weight".

Replay: the hardest recent samples are trained in addition to the scheduled batch (never instead of
its items, so each epoch trains every item), and the fresh anchors are drawn so that the whole
micro-batch, replays included, is stratified over the anchors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..loading.nextdit_keys import detect_comfy_family
from ..losses import (
    NO_ANCHOR,
    HardSampleReplay,
    curvature_neighbour_sigmas,
    curvature_penalty,
    default_curvature_step,
    flow_loss,
    min_snr_weight,
    reduce_loss,
    resolve_loss_params,
    sample_anchor_sigmas,
    sample_shifted_sigmoid_sigmas,
    sample_uniform_sigmas,
    training_anchor_sigmas,
)
from ..samplers.flow import noisy_latent, velocity_target
from . import checkpoint as ckpt
from . import lora, model_patch, optim
from .config import TrainConfig, run_identity
from .dataset import CachedDataset
from .distributed import SINGLE_PROCESS, Ranks
from .save import FAMILY_KEY

log = logging.getLogger("lumina_turbo.training")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    lora: lora.TrainedLora
    loss_history: list[float]
    lr_history: list[float]
    steps: int
    resumed_from: int
    checkpoint: Path | None


@dataclass
class Sample:
    index: int  # dataset item
    sigma: float
    drop_caption: bool = False
    anchor: int = NO_ANCHOR  # index of the anchor the sigma was drawn at (NO_ANCHOR: not an anchor draw)
    replay: bool = False  # trained again from the replay buffer, on top of the scheduled batch


class SampleLosses(NamedTuple):
    objective: torch.Tensor  # [B] L_b: Min-SNR weighted, plus curvature (what is minimised)
    flow: torch.Tensor  # [B] the loss mode's loss before any weighting (what the replay buffer ranks)


@dataclass
class Prepared:
    sample: Sample
    x0: torch.Tensor  # [1, C, h, w], model latent space (process_latent_in)
    noise: torch.Tensor
    jitter: torch.Tensor | None
    cond: torch.Tensor  # [1, L, D], this sample's own caption (or the empty one)


def total_steps(config: TrainConfig, dataset: CachedDataset, world_size: int = 1) -> int:
    """Optimizer steps of the run: from num_train_epochs when set, else max_train_steps."""
    if config.num_train_epochs > 0:
        micro = config.num_train_epochs * dataset.batches_per_epoch(config.batch_size * world_size)
        return max(1, math.ceil(micro / config.gradient_accumulation_steps))
    return config.max_train_steps


class LoraTrainer:
    def __init__(
        self,
        config: TrainConfig,
        model,
        dataset: CachedDataset,
        *,
        run_dir=None,
        on_step: Callable[[int, int, float, float], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
        ranks: Ranks = SINGLE_PROCESS,
    ):
        self.config, self.model, self.dataset = config, model, dataset
        # Several processes train one global micro-batch of batch_size x world_size samples, planned
        # identically on every rank (same generator state) and split between them.
        self.ranks = ranks
        self.global_batch = config.batch_size * ranks.world_size
        self.run_dir = Path(run_dir) if run_dir else None
        self.on_step = on_step
        self.check_interrupt = check_interrupt or (lambda: None)
        self.total = total_steps(config, dataset, ranks.world_size)
        self.loss_params = resolve_loss_params(config.loss_mode, config.loss_params)
        self.anchors = training_anchor_sigmas(
            config.turbo_steps, config.shift, convention=config.anchor_convention
        )
        self.curvature_step = config.curvature_step or (
            default_curvature_step(self.anchors) if len(self.anchors) > 1 else 0.1
        )
        self.curvature_step = min(self.curvature_step, 0.2495)
        diffusion_model = model.model.diffusion_model
        check_compatible(diffusion_model, dataset)
        targets = lora.select_targets(
            diffusion_model,
            attention=config.train_attention,
            ffn=config.train_ffn,
            adaln=config.train_adaln,
            refiners=config.train_refiners,
        )
        self.adapters = lora.create_adapters(
            diffusion_model, targets, config.network_dim, config.network_alpha, config.seed
        )
        self.params = [p for a in self.adapters.values() for p in a.parameters()]
        self.optimizer = optim.make_optimizer(
            config.optimizer_type, self.params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = optim.make_scheduler(
            self.optimizer,
            schedule=config.lr_scheduler,
            total_steps=self.total,
            warmup_steps=config.lr_warmup_steps,
            num_cycles=config.lr_num_cycles,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.replay = HardSampleReplay(config.replay_capacity, config.replay_ratio, config.replay_min_entries)
        self.step = 0
        self.loss_history: list[float] = []
        self.lr_history: list[float] = []
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self._latent_shapes: dict[int, tuple[int, ...]] = {}
        self._phase = "idle"  # idle | accumulating | updating
        self._snapshot: dict | None = None
        self.identity = {
            **run_identity(config),
            "dataset": dataset.key,
            "model": model_patch.model_fingerprint(model),
        }

    # ----- state ---------------------------------------------------------------------------------
    def _mark_step_boundary(self) -> None:
        """Remember the randomness a checkpoint written before the next optimizer step holds (the LoRA and
        optimizer change only in that step): every rank's generator state, gathered here so that writing
        a checkpoint, even on an interrupt, needs no other process."""
        self._snapshot = {
            "generators": self.ranks.all_gather_tensor(
                self.generator.get_state(), "gathering the RNG states"
            ),
            "replay": self.replay.state_dict(),
        }

    def _state(self) -> dict:
        source = self._snapshot
        return {
            "identity": self.identity,
            "step": self.step,
            "total": self.total,
            "lora": lora.lora_state_dict(self.adapters),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": source["generators"][0],
            "generators": source["generators"],  # one per rank
            "world_size": self.ranks.world_size,
            "replay": source["replay"],
            "loss_history": list(self.loss_history),
            "lr_history": list(self.lr_history),
        }

    def save(self) -> Path | None:
        """Write the checkpoint of the last step boundary (rank 0 writes; every rank gets its path)."""
        if self.run_dir is None:
            return None
        if not self.ranks.is_main:
            return ckpt.checkpoint_path(self.run_dir)
        path = ckpt.save_checkpoint(self.run_dir, self._state())
        log.info("lumina_turbo: checkpoint at step %d/%d written to %s", self.step, self.total, path)
        return path

    def _load_on_main(self) -> dict | None:
        """Rank 0 reads the checkpoint and hands it to the others (their machines need not see its folder)."""
        loaded = None
        if self.ranks.is_main:
            try:
                loaded = ("state", ckpt.load_checkpoint(self.run_dir))
            except ckpt.CheckpointMismatch as exc:
                loaded = ("error", str(exc))
        kind, value = self.ranks.broadcast_object(loaded, "sharing the checkpoint")
        if kind == "error":
            raise ckpt.CheckpointMismatch(value)
        return value

    def try_resume(self) -> int:
        if self.run_dir is None or not self.config.resume:
            return 0
        state = self._load_on_main()
        if state is None:
            return 0
        path = ckpt.checkpoint_path(self.run_dir)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ranks.world_size:
            raise ckpt.CheckpointMismatch(
                f"checkpoint {path} was written by {saved_world} process(es), this run has "
                f"{self.ranks.world_size}: resume it with {saved_world} (torchrun --nproc_per_node / accelerate "
                "launch --num_processes, over all machines), or set resume = false or a new checkpoint_dir "
                "to start over"
            )
        ckpt.check_identity(state, self.identity, path)
        lora.load_lora_state(self.adapters, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state.get("generators", [state["generator"]])[self.ranks.rank])
        self.replay.load_state_dict(state["replay"])
        self.step = int(state["step"])
        self.loss_history, self.lr_history = list(state["loss_history"]), list(state["lr_history"])
        log.info("lumina_turbo: resumed from %s at step %d", ckpt.checkpoint_path(self.run_dir), self.step)
        return self.step

    # ----- data and randomness -------------------------------------------------------------------
    def _batch_items(self, micro_step: int) -> list[int]:
        """The dataset items of global micro-batch ``micro_step`` (all ranks' shares)."""
        per_epoch = self.dataset.batches_per_epoch(self.global_batch)
        epoch, position = divmod(micro_step, per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = self.dataset.epoch_batches(
                epoch, self.global_batch, self.config.seed, self.config.shuffle
            )
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1][position]

    def _fresh_sigmas(self, count: int, taken: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [count], anchor index or NO_ANCHOR [count]); ``taken``: anchors already in the batch."""
        config, generator = self.config, self.generator
        no_anchor = torch.full((count,), NO_ANCHOR, dtype=torch.int64)
        if config.timestep_method == "uniform":
            return sample_uniform_sigmas(count, generator, shift=config.shift), no_anchor
        if config.timestep_method == "shifted_sigmoid":
            sigmas = sample_shifted_sigmoid_sigmas(
                count,
                generator,
                shift=config.shift,
                sigmoid_mean=config.sigmoid_mean,
                sigmoid_scale=config.sigmoid_scale,
            )
            return sigmas, no_anchor
        sigmas, anchors = sample_anchor_sigmas(
            count, self.anchors, generator, jitter_scale=config.jitter_scale, taken=taken
        )
        if config.raft_mode:
            free = torch.rand(count, generator=generator) < config.free_stream_ratio
            sigmas = torch.where(free, sample_uniform_sigmas(count, generator, shift=config.shift), sigmas)
            anchors = torch.where(free, no_anchor, anchors)
        return sigmas, anchors

    def _plan(self, items: list[int]) -> list[Sample]:
        """The scheduled ``items`` with fresh sigmas, then the replays drawn for this batch (on top)."""
        replays = self.replay.plan_replays(len(items), self.generator)
        taken = [anchor for _, _, anchor in replays if anchor != NO_ANCHOR]
        sigmas, anchors = self._fresh_sigmas(len(items), taken)
        samples = [
            Sample(i, float(s), anchor=int(a))
            for i, s, a in zip(items, sigmas.tolist(), anchors.tolist(), strict=True)
        ]
        samples += [Sample(int(i), float(s), anchor=int(a), replay=True) for i, s, a in replays]
        if self.dataset.caption_dropout_rate > 0:
            drops = torch.rand(len(samples), generator=self.generator) < self.dataset.caption_dropout_rate
            for sample, drop in zip(samples, drops.tolist(), strict=True):
                sample.drop_caption = drop
        return samples

    def _latent_shape(self, index: int) -> tuple[int, ...]:
        """[1, C, h, w] of item ``index``; remembered, so other ranks' samples cost no file reads."""
        if index not in self._latent_shapes:
            self._latent_shapes[index] = (1, *self.dataset.latent(index).shape)
        return self._latent_shapes[index]

    # ----- model ---------------------------------------------------------------------------------
    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        base = self.patcher.model
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma
        return base.apply_model(
            x, sigma, c_crossattn=cond, num_tokens=cond.shape[1], transformer_options=options
        )

    def prepare_micro_batch(self, micro_step: int) -> list[Prepared]:
        """This rank's samples of micro-batch ``micro_step`` with their latents, noise, jitter and own caption."""
        return self._prepare(self._plan(self._batch_items(micro_step)))

    def _prepare(self, samples: list[Sample]) -> list[Prepared]:
        """Draws from the trainer's generator in a fixed order: replay plan, sigmas, caption dropout (in
        ``_plan``), then per planned sample its noise (and latent jitter). Every rank draws for every
        sample, so the ranks' generators stay equal and the draws do not depend on the world size; each
        rank keeps its own share."""
        mine = self.ranks.share(len(samples))
        prepared = []
        for position, sample in enumerate(samples):
            shape = self._latent_shape(sample.index)
            noise = torch.randn(shape, generator=self.generator)
            jitter = None
            if self.config.latent_jitter_scale > 0:
                jitter = torch.randn(shape, generator=self.generator) * self.config.latent_jitter_scale
            if position not in mine:
                continue
            x0 = self.patcher.model.process_latent_in(self.dataset.latent(sample.index)[None].float())
            cond = self.dataset.text(None if sample.drop_caption else sample.index)[None]
            prepared.append(Prepared(sample, x0, noise, jitter, cond))
        return prepared

    def per_sample_losses(self, prepared: list[Prepared], curvature: bool = False) -> SampleLosses:
        """L_b (and the unweighted flow loss) for samples that share latent size and caption length: ONE
        forward pass over exactly these samples, each with its own caption (cond row b belongs to latent b)."""
        device = self.device
        sigma = torch.tensor([p.sample.sigma for p in prepared], dtype=torch.float32, device=device)
        x0 = torch.cat([p.x0 for p in prepared]).to(device)
        noise = torch.cat([p.noise for p in prepared]).to(device)
        conds = torch.cat([p.cond for p in prepared]).to(device)
        x_sigma = noisy_latent(x0, noise, sigma)
        if prepared[0].jitter is not None:
            x_sigma = x_sigma + torch.cat([p.jitter for p in prepared]).to(device)
        pred = self._velocity(x_sigma, sigma, conds).float()
        target = velocity_target(x0, noise)
        flow = flow_loss(
            pred,
            target,
            x_sigma,
            sigma,
            self.config.loss_mode,
            self.loss_params,
            latent_rgb_factors=self.rgb_factors,
            latent_rgb_bias=self.rgb_bias,
        )
        per_sample = flow
        if self.config.snr_gamma > 0:
            per_sample = per_sample * min_snr_weight(
                sigma, self.config.snr_gamma, form=self.config.snr_form, floor=self.config.snr_floor
            )
        if curvature:
            first, second = curvature_neighbour_sigmas(sigma, self.curvature_step)
            with torch.no_grad():
                v_first = self._velocity(noisy_latent(x0, noise, first), first, conds).float()
                v_second = self._velocity(noisy_latent(x0, noise, second), second, conds).float()
            per_sample = per_sample + self.config.curvature_weight * curvature_penalty(
                pred, sigma, v_first, first, v_second, second, step=self.curvature_step
            )
        return SampleLosses(per_sample, flow.detach())

    def _micro_step(self, micro_step: int) -> float:
        self.check_interrupt()
        samples = self._plan(self._batch_items(micro_step))
        prepared = self._prepare(samples)
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(prepared):
            groups.setdefault((tuple(item.x0.shape), tuple(item.cond.shape)), []).append(position)
        use_curvature = (
            self.config.curvature_weight > 0
            and self.step >= self.config.curvature_start_step
            and micro_step % self.config.curvature_interval == 0
        )
        batch, accumulation = len(samples), self.config.gradient_accumulation_steps
        losses, flows = torch.zeros(len(prepared)), torch.zeros(len(prepared))
        for members in groups.values():
            per_sample, flow = self.per_sample_losses([prepared[i] for i in members], use_curvature)
            # mean over the whole (global) micro-batch, taken group by group so each graph is freed early;
            # a non-finite loss is refused below, before any optimizer step
            (reduce_loss(per_sample) * len(members) / batch / accumulation).backward()
            losses[members] = per_sample.detach().float().cpu()
            flows[members] = flow.float().cpu()
        # every rank records every sample, so the replay buffers (and the verdict below) stay equal
        sizes = [2 * len(self.ranks.share(batch, rank)) for rank in range(self.ranks.world_size)]
        shares = self.ranks.all_gather_tensor(
            torch.cat([losses, flows]), "gathering the per-sample losses", sizes
        )
        losses = torch.cat([share[: len(share) // 2] for share in shares])
        flows = torch.cat([share[len(share) // 2 :] for share in shares])
        if not torch.isfinite(losses).all():
            self._diverged(f"the loss is {losses.tolist()}")
        self.replay.record(
            [s.index for s in samples], [s.sigma for s in samples], flows, anchors=[s.anchor for s in samples]
        )
        return float(losses.mean())

    def _diverged(self, what: str):
        last = ckpt.checkpoint_path(self.run_dir) if self.run_dir else None
        kept = (
            f"the last good checkpoint {last} is kept"
            if last and last.is_file()
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"training stopped at step {self.step + 1}/{self.total}: {what}. The LoRA was not updated with it; "
            f"{kept}. Lower learning_rate, use mixed_precision = fp32, or set max_grad_norm."
        )

    def _optimizer_step(self) -> tuple[float, float]:
        self._phase = "accumulating"
        accumulation = self.config.gradient_accumulation_steps
        micro_losses = [self._micro_step(self.step * accumulation + k) for k in range(accumulation)]
        self.ranks.sum_gradients(self.params)
        norm = None
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
            )
        if not torch.isfinite(norm):
            self._diverged(f"the gradient norm is {float(norm)}")
        lr = self.optimizer.param_groups[0]["lr"]
        self._phase = "updating"
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = sum(micro_losses) / len(micro_losses)
        self.loss_history.append(loss)
        self.lr_history.append(lr)
        self._mark_step_boundary()
        self._phase = "idle"
        return loss, lr

    # ----- run -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def loaded(self):
        """The training clone built and loaded by ComfyUI's model management, autograd on; unloaded after."""
        compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.config.mixed_precision]
        base = self.model.model
        if base.manual_cast_dtype is None and base.get_dtype() == compute_dtype:
            compute_dtype = None
        self.patcher = model_patch.build_training_patcher(
            self.model,
            self.adapters,
            compute_dtype=compute_dtype,
            gradient_checkpointing=self.config.gradient_checkpointing,
        )
        latent_format = self.patcher.model.latent_format
        self.rgb_factors = self.rgb_bias = None
        if (
            self.config.style_basis == "latent_rgb"
            and getattr(latent_format, "latent_rgb_factors", None) is not None
        ):
            self.rgb_factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)
            bias = getattr(latent_format, "latent_rgb_factors_bias", None)
            self.rgb_bias = torch.tensor(bias, dtype=torch.float32) if bias is not None else None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                model_patch.load_for_training(self.patcher, self.config.blocks_to_swap)
                self.device = self.patcher.load_device
                for adapter in self.adapters.values():
                    adapter.to(self.device)
                _move_optimizer_state(self.optimizer, self.device)
                if self.rgb_factors is not None:
                    self.rgb_factors = self.rgb_factors.to(self.device)
                    self.rgb_bias = self.rgb_bias.to(self.device) if self.rgb_bias is not None else None
                yield self
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model_patch.release(self.patcher)
            for adapter in self.adapters.values():
                adapter.to("cpu")

    def run(self) -> TrainResult:
        import comfy.model_management as mm

        resumed_from = self.try_resume()
        self._mark_step_boundary()
        last_checkpoint = None
        with self.loaded():
            try:
                while self.step < self.total:
                    loss, lr = self._optimizer_step()
                    if self.config.save_every_n_steps and self.step % self.config.save_every_n_steps == 0:
                        last_checkpoint = self.save()
                    if self.on_step is not None:
                        self.on_step(self.step, self.total, loss, lr)
                if self.step > resumed_from or last_checkpoint is None:
                    last_checkpoint = self.save()
            except (mm.InterruptProcessingException, KeyboardInterrupt):
                if self._phase != "updating":
                    self.save()
                raise
        return TrainResult(
            lora.TrainedLora(lora.lora_state_dict(self.adapters), self.metadata()),
            list(self.loss_history),
            list(self.lr_history),
            self.step,
            resumed_from,
            last_checkpoint,
        )

    def metadata(self) -> dict[str, str]:
        config = self.config
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(config.network_dim),
            "ss_network_alpha": str(config.network_alpha),
            "ss_steps": str(self.step),
            "ss_learning_rate": str(config.learning_rate),
            "ss_seed": str(config.seed),
            "lumina_turbo.trainer": "LTLoraTrainer (AC-RF)",
            FAMILY_KEY: detect_comfy_family(dict(self.model.model.diffusion_model.named_parameters())),
            "lumina_turbo.steps": str(self.step),
            "lumina_turbo.targets": json.dumps(sorted(self.adapters)),
            "lumina_turbo.anchors": json.dumps([round(float(a), 6) for a in self.anchors]),
            "lumina_turbo.dataset": self.dataset.key,
            "lumina_turbo.config": json.dumps(
                {k: v for k, v in config.model_dump().items() if k in self.identity}, default=str
            ),
            "lumina_turbo.final_loss": f"{self.loss_history[-1]:.6g}" if self.loss_history else "",
        }


def check_compatible(diffusion_model, dataset: CachedDataset) -> None:
    """Refuse a dataset encoded for another model family before any forward pass fails deep in torch."""
    if len(dataset) == 0:
        raise ValueError("dataset: holds no images")
    channels = getattr(diffusion_model, "in_channels", None)
    latent_channels = dataset.latent(0).shape[0]
    if channels is not None and latent_channels != channels:
        raise ValueError(
            f"dataset: its latents have {latent_channels} channels but the model takes {channels}; build "
            "LTDataset with this model's VAE"
        )
    embedder = getattr(diffusion_model, "cap_embedder", None)
    width = getattr(embedder[-1], "in_features", None) if embedder is not None else None
    text_width = dataset.text(0).shape[-1]
    if width is not None and text_width != width:
        raise ValueError(
            f"dataset: its captions were encoded {text_width} wide but the model reads {width}-wide text "
            "features; build LTDataset with this model's text encoder"
        )


def _move_optimizer_state(optimizer, device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)
