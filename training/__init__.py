"""The AC-RF LoRA trainer: cached datasets, LoRA injection, the training loop, checkpoints, config, CLI.

One engine (``engine.LoraTrainer``) serves the ComfyUI nodes (nodes/training.py) and the headless
command line (``python -m lumina_turbo.train --config file.toml``). Math lives in ``losses/`` and
``samplers/`` (pure torch); this package touches ComfyUI models only through ModelPatcher extension
points on a clone.

Time convention: ComfyUI sigma (1 = noise, 0 = data), x_sigma = (1 - sigma) x0 + sigma eps, target
velocity v = eps - x0; Lumina t = 1 - sigma; diffusers timestep = 1000 sigma.
"""
