"""The training engine on the tiny Lumina-2 model: own captions per latent, exact resume, NaN stop,
checkpoint identity, LoRA targets and initialisation, every loss option wired, block swapping."""

import pytest
import torch

from lumina_turbo.devtools.example_dataset import solid_image, write_concept_dataset, write_image
from lumina_turbo.devtools.training_support import build, one_thread, small_config, tiny_family, token_length  # noqa: F401
from lumina_turbo.training import checkpoint, engine, lora


@pytest.fixture(scope="module")
def lumina2(tiny_models):
    return tiny_family("lumina2")


@pytest.fixture(scope="module")
def concept(tmp_path_factory, lumina2):
    root = tmp_path_factory.mktemp("concept")
    write_concept_dataset(root / "data", count=3)
    return build(root / "data", caption_dropout_rate=0.3)


def lora_tensors(result):
    return {k: v.clone() for k, v in result.lora.items()}


def test_targets_and_zero_init(lumina2):
    model, _, _ = lumina2
    dm = model.model.diffusion_model
    default = lora.select_targets(dm)
    assert default == [
        f"layers.{i}.{m}"
        for i in range(2)
        for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ]
    extended = lora.select_targets(dm, adaln=True, refiners=True)
    assert "noise_refiner.0.attention.qkv" in extended and "context_refiner.0.feed_forward.w2" in extended
    assert "layers.1.adaLN_modulation.1" in extended and not any(
        "norm" in n or "embedder" in n for n in extended
    )
    adapters = lora.create_adapters(dm, default, rank=4, alpha=2.0, seed=0)
    assert all(
        float(a.lora_up.detach().abs().max()) == 0 and float(a.lora_down.detach().abs().max()) > 0
        for a in adapters.values()
    )
    again = lora.create_adapters(dm, default, rank=4, alpha=2.0, seed=0)
    assert all(torch.equal(adapters[n].lora_down, again[n].lora_down) for n in default)


def test_lora_at_init_predicts_the_base_velocity(lumina2, concept):
    model, _, _ = lumina2
    trainer = engine.LoraTrainer(small_config(), model, concept)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    cond = concept.text(0)[None]
    with torch.no_grad():
        base_denoised = model.model.apply_model(x, sigma, c_crossattn=cond, num_tokens=cond.shape[1])
        with trainer.loaded():
            velocity = trainer._velocity(x, sigma, cond)
    # velocity output = (x - denoised) / sigma for a CONST model; the LoRA starts at zero
    torch.testing.assert_close(velocity, (x - base_denoised) / sigma, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_captions(tmp_path_factory, lumina2):
    _, clip, _ = lumina2
    first, second = "a photo of a red cat", "a photo of a blue dog"
    assert token_length(clip, first) == token_length(clip, second), "captions must batch together"
    root = tmp_path_factory.mktemp("pair")
    write_image(root / "data", "red", solid_image((0.9, 0.1, 0.1)), first)
    write_image(root / "data", "blue", solid_image((0.1, 0.1, 0.9)), second)
    return build(root / "data")


def test_batch_trains_each_latent_against_its_own_caption(lumina2, two_captions):
    model, _, _ = lumina2
    config = small_config(batch_size=2, snr_gamma=0.0)
    trainer = engine.LoraTrainer(config, model, two_captions)
    with trainer.loaded():
        prepared = trainer.prepare_micro_batch(0)
        assert {p.sample.index for p in prepared} == {0, 1}
        for p in prepared:  # the cond row is the sample's own caption
            torch.testing.assert_close(p.cond[0], two_captions.text(p.sample.index))
        with torch.no_grad():
            batched = trainer.per_sample_losses(prepared).objective
            alone = torch.cat([trainer.per_sample_losses([p]).objective for p in prepared])
            swapped = [
                engine.Prepared(p.sample, p.x0, p.noise, p.jitter, q.cond)
                for p, q in zip(prepared, prepared[::-1], strict=True)
            ]
            wrong_caption = trainer.per_sample_losses(swapped).objective
            # ComfyUI TrainLoraNode-style mixing: every latent sees every caption, predictions averaged
            sigma = torch.tensor([p.sample.sigma for p in prepared])
            x0 = torch.cat([p.x0 for p in prepared])
            noise = torch.cat([p.noise for p in prepared])
            x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            mixed = torch.stack(
                [trainer._velocity(x, sigma, p.cond.expand(2, -1, -1)) for p in prepared]
            ).mean(0)
            mixed_loss = ((mixed - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    assert (batched - wrong_caption).abs().min() > 1e-4, "the test must be able to see a caption swap"
    assert (batched - mixed_loss).abs().max() > 1e-4, "the test must be able to see caption mixing"
    # and the training loop itself computes exactly these losses (recorded in the replay buffer)
    fresh = engine.LoraTrainer(config, model, two_captions)
    with fresh.loaded():
        fresh._optimizer_step()
    recorded = sorted(fresh.replay.entries())
    expected = sorted((p.sample.index, p.sample.sigma, float(batched[i])) for i, p in enumerate(prepared))
    assert [(i, s) for i, s, _ in recorded] == [(i, s) for i, s, _ in expected]
    torch.testing.assert_close(
        torch.tensor([x[2] for x in recorded]), torch.tensor([x[2] for x in expected]), rtol=1e-5, atol=1e-6
    )


def test_replay_ranks_the_unweighted_flow_loss(lumina2, concept):
    """Min-SNR weights and the curvature term change what is minimised, not which samples are hardest."""
    model, _, _ = lumina2
    config = small_config(
        batch_size=2, snr_gamma=5.0, snr_floor=0.0, curvature_weight=0.5, loss_mode="standard"
    )
    trainer = engine.LoraTrainer(config, model, concept)
    with trainer.loaded(), torch.no_grad():
        prepared = trainer.prepare_micro_batch(0)
        sigma = torch.tensor([p.sample.sigma for p in prepared])
        x0, noise = torch.cat([p.x0 for p in prepared]), torch.cat([p.noise for p in prepared])
        x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        v = trainer._velocity(x, sigma, torch.cat([p.cond for p in prepared]))
        reference = (v - (noise - x0)).square().flatten(1).mean(1)  # standard mode: plain velocity MSE
        objective = trainer.per_sample_losses(prepared, curvature=True).objective
    assert (objective - reference).abs().min() > 1e-3, (
        "weights must change the objective, or this test sees nothing"
    )
    fresh = engine.LoraTrainer(config, model, concept)
    with fresh.loaded():
        fresh._optimizer_step()  # curvature is on at micro-step 0
    recorded = {(i, round(s, 6)): loss for i, s, loss in fresh.replay.entries()}
    expected = {
        (p.sample.index, round(p.sample.sigma, 6)): float(reference[k]) for k, p in enumerate(prepared)
    }
    assert recorded.keys() == expected.keys()
    torch.testing.assert_close(
        torch.tensor([recorded[k] for k in expected]),
        torch.tensor(list(expected.values())),
        rtol=1e-5,
        atol=1e-7,
    )


def _plan_epochs(trainer, micro_steps):
    """Plan micro-batches in order, feeding the buffer made-up losses (a replay then happens every step)."""
    planned = []
    for micro in range(micro_steps):
        samples = [p.sample for p in trainer.prepare_micro_batch(micro)]
        planned.append((trainer._batch_items(micro), samples))
        losses = torch.arange(len(samples), dtype=torch.float32) + micro
        trainer.replay.record(
            [s.index for s in samples],
            [s.sigma for s in samples],
            losses,
            anchors=[s.anchor for s in samples],
        )
    return planned


def test_replays_come_on_top_of_the_scheduled_batch(lumina2, concept):
    model, _, _ = lumina2
    config = small_config(batch_size=2, replay_ratio=0.5, replay_min_entries=1, replay_capacity=8)
    trainer = engine.LoraTrainer(config, model, concept)
    per_epoch = concept.batches_per_epoch(2)
    with trainer.loaded():
        planned = _plan_epochs(trainer, 3 * per_epoch)
    replayed = 0
    for items, samples in planned:
        fresh = [s.index for s in samples if not s.replay]
        assert fresh == items, "every scheduled item is trained, in its slot"
        assert all(s.replay for s in samples[len(items) :])
        replayed += len(samples) - len(items)
    assert replayed >= per_epoch  # about one replay per batch of 2 at ratio 0.5
    for epoch in range(3):
        trained = sorted(
            i for items, _ in planned[epoch * per_epoch : (epoch + 1) * per_epoch] for i in items
        )
        assert trained == sorted(range(len(concept)))


def test_whole_batch_with_replays_is_stratified_over_the_anchors(lumina2, concept):
    model, _, _ = lumina2
    config = small_config(
        batch_size=4,
        turbo_steps=4,
        replay_ratio=1.0,
        replay_min_entries=1,
        replay_capacity=16,
        jitter_scale=0.0,
    )
    trainer = engine.LoraTrainer(config, model, concept)  # 3 items: one batch of 3 per epoch
    with trainer.loaded():
        planned = _plan_epochs(trainer, 6)
    with_replays = 0
    for _, samples in planned:
        counts = torch.bincount(torch.tensor([s.anchor for s in samples]), minlength=4)
        if len(samples) >= 4:  # 3 fresh + replays: the whole batch covers the 4 anchors evenly
            with_replays += 1
            assert counts.min() == len(samples) // 4 and counts.max() <= len(samples) // 4 + 1, counts
        for s in samples:  # the sigma is the anchor's (no jitter), replays keep theirs
            assert abs(s.sigma - float(trainer.anchors[s.anchor].clamp(0.001, 0.999))) < 1e-6
    assert with_replays >= 4


def _interrupt_after(step):
    import comfy.model_management as mm

    def on_step(done, total, loss, lr):
        if done == step:
            mm.interrupt_current_processing(True)

    return on_step


def test_exact_resume_after_interrupt(lumina2, concept, tmp_path):
    import comfy.model_management as mm

    model, _, _ = lumina2
    config = small_config(
        max_train_steps=6,
        batch_size=2,
        gradient_accumulation_steps=2,
        replay_ratio=0.5,
        replay_min_entries=2,
        latent_jitter_scale=0.01,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        save_every_n_steps=0,
        loss_mode="frequency",
    )
    straight = engine.LoraTrainer(config, model, concept, run_dir=tmp_path / "straight").run()
    run_dir = tmp_path / "interrupted"
    check = mm.throw_exception_if_processing_interrupted
    with pytest.raises(mm.InterruptProcessingException):
        engine.LoraTrainer(
            config, model, concept, run_dir=run_dir, on_step=_interrupt_after(3), check_interrupt=check
        ).run()
    saved = checkpoint.load_checkpoint(run_dir)
    assert saved["step"] == 3 and len(saved["loss_history"]) == 3
    resumed = engine.LoraTrainer(config, model, concept, run_dir=run_dir, check_interrupt=check).run()
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.loss_history == straight.loss_history
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_up" in k), "the LoRA must have moved"


def test_checkpoint_of_another_run_is_refused(lumina2, concept, tmp_path):
    model, _, _ = lumina2
    engine.LoraTrainer(small_config(max_train_steps=1), model, concept, run_dir=tmp_path).run()
    with pytest.raises(checkpoint.CheckpointMismatch, match="learning_rate"):
        engine.LoraTrainer(
            small_config(max_train_steps=2, learning_rate=2e-3), model, concept, run_dir=tmp_path
        ).run()
    # resume = false starts over instead
    result = engine.LoraTrainer(
        small_config(max_train_steps=1, learning_rate=2e-3, resume=False), model, concept, run_dir=tmp_path
    ).run()
    assert result.resumed_from == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(lumina2, tmp_path):
    model, _, _ = lumina2
    write_concept_dataset(tmp_path / "data", count=2)
    data = build(tmp_path / "data", cache=tmp_path / "cache")
    engine.LoraTrainer(
        small_config(max_train_steps=2, save_every_n_steps=1), model, data, run_dir=tmp_path / "run"
    ).run()
    before = checkpoint.checkpoint_path(tmp_path / "run").read_bytes()
    data.latent(0)[0, 0, 0] = float("nan")  # a corrupt sample (in memory only)
    data.latent(1)[0, 0, 0] = float("nan")
    with pytest.raises(
        engine.TrainingDiverged, match=r"step 3/4.*nan.*last good checkpoint .*training_state\.pt"
    ):
        engine.LoraTrainer(
            small_config(max_train_steps=4, save_every_n_steps=1), model, data, run_dir=tmp_path / "run"
        ).run()
    assert checkpoint.checkpoint_path(tmp_path / "run").read_bytes() == before


def test_all_loss_options_train(lumina2, concept):
    model, _, _ = lumina2
    config = small_config(
        max_train_steps=2,
        batch_size=2,
        loss_mode="unified",
        curvature_weight=0.5,
        replay_ratio=0.5,
        replay_min_entries=1,
        raft_mode=True,
        snr_gamma=5.0,
        snr_form="vp_v_prediction",
        gradient_checkpointing=True,
        max_grad_norm=0.5,
        loss_params={"lambda_l1": 0.5, "lambda_cos": 0.1, "lambda_fft": 0.1},
    )
    result = engine.LoraTrainer(config, model, concept).run()
    assert len(result.loss_history) == 2 and all(torch.isfinite(torch.tensor(result.loss_history)))
    assert any(float(v.abs().max()) > 0 for k, v in result.lora.items() if "lora_up" in k)


def _module_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("blocks", [1, 2])
def test_block_swapping_streams_exactly_the_last_blocks(lumina2, blocks):
    """The swapped blocks are never loaded regularly: ComfyUI gets a budget without them and streams
    exactly their modules (ComfyUI left to itself picks by size: its partial unload frees the smallest
    modules of the whole model - norms, embedders, refiners - first)."""
    import comfy.model_management as mm
    from comfy.patcher_extension import CallbacksMP

    from lumina_turbo.training import model_patch

    model, _, _ = lumina2
    dm = model.model.diffusion_model
    patcher = model_patch.build_training_patcher(model, {}, compute_dtype=None, gradient_checkpointing=True)
    loads = []
    patcher.add_callback(
        CallbacksMP.ON_LOAD, lambda mp, device, budget, force, full: loads.append((budget, full))
    )
    chosen = list(range(len(dm.layers) - blocks, len(dm.layers)))
    expected = sorted(
        f"diffusion_model.layers.{i}.{name}"
        for i in chosen
        for name, m in dm.layers[i].named_modules()
        if list(m.parameters(recurse=False))
    )
    swapped_bytes = sum(_module_bytes(dm.layers[i]) for i in chosen)
    try:
        plan = model_patch.load_for_training(patcher, blocks)
        assert plan.blocks == chosen and plan.modules == expected and plan.streamed_bytes == swapped_bytes
        assert model_patch.streamed_modules(patcher) == expected
        # only the other modules were loaded; the budget ComfyUI loaded with leaves the swapped blocks out
        others = _module_bytes(dm) - swapped_bytes
        unlisted = _module_bytes(dm) - sum(entry[1] for entry in patcher._load_list())  # pad tokens etc.
        assert patcher.model.model_loaded_weight_memory == others - unlisted
        largest = max(
            _module_bytes(m)
            for i in chosen
            for m in dm.layers[i].modules()
            if list(m.parameters(recurse=False))
        )
        buffer = largest * (mm.NUM_STREAMS + 1)  # ComfyUI's streaming buffer
        ((budget, full_load),) = loads
        assert not full_load and budget == plan.budget
        assert budget <= patcher.model_size() - swapped_bytes + buffer + 1 < patcher.model_size()
        for name in expected:  # streamed: cast per use from the offload device
            module = patcher.get_model_object(name)
            assert module.comfy_cast_weights and module.weight.device == patcher.offload_device
    finally:
        model_patch.release(patcher)
    assert not any(hasattr(m, "prev_comfy_cast_weights") for m in dm.modules()), (
        "release restores the modules"
    )


def test_block_swapping_trains_identically(lumina2, concept):
    model, _, _ = lumina2
    config = small_config(max_train_steps=2, gradient_checkpointing=True, batch_size=2)
    plain = engine.LoraTrainer(config, model, concept).run()
    for blocks in (1, 2):
        swapped = engine.LoraTrainer(config.replace(blocks_to_swap=blocks), model, concept).run()
        assert swapped.loss_history == plain.loss_history
        assert all(torch.equal(plain.lora[k], swapped.lora[k]) for k in plain.lora)


def test_model_identity_sees_loras_not_in_place_patching(lumina2, concept):
    import comfy.model_management as mm
    import comfy.sd

    from lumina_turbo.training import model_patch

    model, _, _ = lumina2
    base = model_patch.model_fingerprint(model)
    trained = engine.LoraTrainer(small_config(max_train_steps=1, learning_rate=1e-2), model, concept).run()
    patched, _ = comfy.sd.load_lora_for_models(model, None, trained.lora, 1.0, 0)
    mm.load_models_gpu([patched])  # the base weights are now patched in place
    assert model_patch.model_fingerprint(model) == base
    assert model_patch.model_fingerprint(patched) != base


def test_dataset_of_another_family_is_refused(lumina2, tmp_path):
    model, _, _ = lumina2
    write_concept_dataset(tmp_path / "data", count=1)
    data = build(tmp_path / "data", cache=tmp_path / "cache")
    width = model.model.diffusion_model.cap_embedder[-1].in_features
    # captions as another family's text encoder would give them (e.g. Gemma-2 2304 for a 2560 Qwen3 model)
    data._load(data.items[0].text_file)["cond"] = torch.zeros(7, width + 16)
    with pytest.raises(ValueError, match="this model's text encoder"):
        engine.LoraTrainer(small_config(), model, data)
    data._load(data.items[0].latent_file)["latent"] = torch.zeros(4, 8, 8)
    with pytest.raises(ValueError, match="this model's VAE"):
        engine.LoraTrainer(small_config(), model, data)


def test_bf16_compute_trains_a_float32_lora(lumina2, concept):
    model, _, _ = lumina2
    result = engine.LoraTrainer(small_config(max_train_steps=2, mixed_precision="bf16"), model, concept).run()
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    assert all(v.dtype == torch.float32 for v in result.lora.values())
    assert any(float(v.abs().max()) > 0 for k, v in result.lora.items() if "lora_up" in k)
