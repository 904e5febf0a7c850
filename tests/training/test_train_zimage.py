"""Done-when: AC-RF training of the tiny Z-Image model on a synthetic concept lowers the velocity loss at
every anchor and moves 8-step anchor-schedule samples towards the concept; the saved LoRA loads in
ComfyUI's stock LoraLoader with no "lora key not loaded" warning and reproduces the trained model."""

import logging
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from lumina_turbo.devtools import evaluate
from lumina_turbo.devtools.example_dataset import write_concept_dataset
from lumina_turbo.devtools.training_support import build, one_thread, small_config, tiny_family  # noqa: F401 (autouse)
from lumina_turbo.samplers.schedules import anchor_sigmas
from lumina_turbo.training import engine


@pytest.mark.slow
def test_anchor_training_learns_the_concept(tiny_models, tmp_path, caplog):
    model, clip, _ = tiny_family("zimage")
    import comfy.sd

    write_concept_dataset(tmp_path / "data", count=4)
    data = build(tmp_path / "data", family="zimage")
    schedule = anchor_sigmas(8, 3.0)  # the 8-step Z-Image-Turbo schedule the LoRA trains on
    config = small_config(
        max_train_steps=16,
        network_dim=8,
        network_alpha=8.0,
        learning_rate=5e-3,
        batch_size=2,
        turbo_steps=8,
        shift=3.0,
        snr_gamma=0.0,
    )
    concept = torch.cat([model.model.process_latent_in(data.latent(i)[None]) for i in range(len(data))]).mean(
        0
    )
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = data.text(0)[None]

    loss_before = evaluate.anchor_velocity_losses(model, data, schedule[:-1], draws=1)
    sample_before = evaluate.euler_sample(model, noise, schedule, cond)
    distance_before = (sample_before - concept).square().mean()
    result = engine.LoraTrainer(config, model, data).run()
    trained, _ = comfy.sd.load_lora_for_models(model, None, result.lora, 1.0, 0)  # = the trainer's MODEL
    loss_after = evaluate.anchor_velocity_losses(trained, data, schedule[:-1], draws=1)
    distance_after = (evaluate.euler_sample(trained, noise, schedule, cond) - concept).square().mean()

    assert (loss_after < loss_before).all(), (loss_before, loss_after)
    assert loss_after.mean() < 0.92 * loss_before.mean(), (loss_before, loss_after)
    assert distance_after < 0.92 * distance_before, (distance_before, distance_after)
    # the base model is untouched (the LoRA lives in the returned clone only)
    assert torch.equal(evaluate.euler_sample(model, noise, schedule, cond), sample_before)

    # the file LTSaveLora writes, through ComfyUI's stock LoraLoader
    import folder_paths
    import nodes

    from lumina_turbo.training.save import save_lora_file

    subfolder = f"lt_test_{uuid.uuid4().hex[:8]}"
    loras_dir = Path(folder_paths.get_folder_paths("loras")[0])
    try:
        path = save_lora_file(result.lora, loras_dir, f"{subfolder}/zimage", dtype="fp32")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stock, _ = nodes.LoraLoader().load_lora(model, clip, f"{subfolder}/{path.name}", 1.0, 1.0)
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
        assert len(stock.patches) == len(trained.patches) == len(result.lora) // 3
        torch.testing.assert_close(
            evaluate.euler_sample(stock, noise, schedule, cond),
            evaluate.euler_sample(trained, noise, schedule, cond),
            rtol=0,
            atol=0,
        )
    finally:
        shutil.rmtree(loras_dir / subfolder, ignore_errors=True)
