"""What the trainer learns, per setting: a teacher-student problem on the real architectures.

B = tiny-random Z-Image (and tiny-random Lumina-2), T = B + a known LoRA on the layers the trainer
targets; training data = T's own samples (latents through the trainer's LATENT path, 4 captions);
held out = T's samples from other seeds (devtools/teacher_student.py). Each configuration trains the
same rank-16 LoRA from B for the same optimizer steps (batch 1, fp32, no gradient checkpointing,
turbo_steps 8; Z-Image 90 steps at lr 1e-4, Lumina-2 300 steps at lr 1e-3) over 3 training seeds; everything else is the option defaults. ComfyUI's
TrainLoraNode gets the same latents, one caption per latent, rank, lr, batch and steps.

Metrics (fraction of the B->T gap closed; B = 0 %, T = 100 %; mean and min..max over seeds):
velocity = held-out velocity MSE to T at the 8 sampling anchors; fid N = the N-step anchor-schedule
Euler sample vs T's (same noise and caption), N = 4, 8, 30. Equal wall time: each run's seconds per
optimizer step (median step interval, evaluation excluded) turn its velocity curve (evaluated at 1/3,
2/3 and all of the steps; 0 at step 0, where every LoRA starts as B) into gap-vs-seconds, read at the
time the default configuration needed for all its steps (median over its seeds; "k/3*": k runs had
done all their steps sooner, their final value is used - they could have trained on).

Real weights: MODEL=<diffusers folder, or a transformer file with TEXT_ENCODER=<file>> and
TEACHER_LORA=<LoRA file in a layout ComfyUI's LoraLoader reads, e.g. one LTSaveLora wrote> make B and
T real (LATENT=<latent side>, default 64; STEPS=<steps>, default 90); all Z-Image rows run, as "real".
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
RANK = 16
LR = {
    "zimage": 1e-4,
    "lumina2": 1e-3,
    "real": 1e-4,
}  # the 96-wide Lumina-2 learns 10x slower per step at 1e-4
LATENT = 8
STEPS = {"zimage": 90, "lumina2": 300, "real": 90}
CURVE = (1 / 3, 2 / 3, 1.0)
CONFIGS = {
    "default": ("defaults: anchors + jitter, standard loss, Min-SNR 5 (RF form)", {}),
    "uniform": ("timesteps: uniform (shifted)", {"timestep_method": "uniform"}),
    "logit_normal": ("timesteps: shifted logit-normal", {"timestep_method": "shifted_sigmoid"}),
    "frequency": ("loss: frequency", {"loss_mode": "frequency"}),
    "style": ("loss: style", {"loss_mode": "style"}),
    "unified": ("loss: unified", {"loss_mode": "unified"}),
    "snr_off": ("Min-SNR off", {"snr_gamma": 0.0}),
    "snr_vp": ("Min-SNR 5, VP form (AC-RF's)", {"snr_form": "vp_v_prediction"}),
    "replay": ("replay 0.5", {"replay_ratio": 0.5, "replay_min_entries": 4}),
    "curvature": ("curvature 0.05", {"curvature_weight": 0.05}),
}
TRAINLORANODE = "trainloranode"
LABELS = {
    **{k: v[0] for k, v in CONFIGS.items()},
    TRAINLORANODE: "ComfyUI TrainLoraNode (same data, rank, lr, steps)",
}
FAMILY_CONFIGS = {
    "zimage": [*CONFIGS, TRAINLORANODE],
    "lumina2": [*CONFIGS, TRAINLORANODE],
    "real": [*CONFIGS, TRAINLORANODE],
}


def real_weights() -> bool:
    return bool(os.environ.get("MODEL"))


def load_base(family: str):
    """(MODEL, CLIP) of B: the tiny family, or the real model named by $MODEL."""
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    if not real_weights():
        from lumina_turbo.devtools.training_support import tiny_family

        model, clip, _ = tiny_family(family)
        return model, clip
    from lumina_turbo.loading import model_files

    path = Path(os.environ["MODEL"])
    if path.is_dir():
        return model_files.load_transformer_folder(path), model_files.clip_from_diffusers_folder(path)
    return model_files.load_transformer_file(path), model_files.load_text_encoder_file(
        os.environ["TEXT_ENCODER"]
    )


def _problem_child(family: str, path: str, cache: str) -> dict:
    import torch

    torch.set_num_threads(1)
    model, clip = load_base(family)
    from lumina_turbo.devtools import teacher_student as ts

    teacher = None
    if real_weights():
        import comfy.utils

        teacher = comfy.utils.load_torch_file(os.environ["TEACHER_LORA"], safe_load=True)
    start = time.perf_counter()
    problem = ts.make_problem(
        model,
        clip,
        cache,
        family=family,
        latent_size=int(os.environ.get("LATENT", 64 if real_weights() else LATENT)),
        teacher_tensors=teacher,
        loss_draws=1,
    )
    ts.save_problem(problem, path)
    return {**ts.describe(problem), "build_s": round(time.perf_counter() - start, 1)}


def _train_child(family: str, which: str, path: str, cache: str, steps: int, out: str) -> None:
    """Train every configuration in ``which`` (comma-separated), seeds interleaved; one JSON line per run."""
    import torch

    torch.set_num_threads(1)
    model, clip = load_base(family)
    import comfy.model_management as mm
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from lumina_turbo.devtools import teacher_student as ts

    problem = ts.load_problem(path, model, clip, cache)
    checkpoints = sorted({max(1, round(f * steps)) for f in CURVE})
    for seed in SEEDS:
        for name in which.split(","):
            state = {"step": 0, "last": None, "intervals": [], "curve": []}

            def hook(*_, state=state):
                now = time.perf_counter()
                if state["last"] is not None:
                    state["intervals"].append(now - state["last"])
                state["step"] += 1
                if state["step"] in checkpoints[:-1]:  # the model being trained, as it is now
                    state["curve"].append(
                        (state["step"], ts.evaluate(problem, model.model, steps=())["loss"])
                    )
                state["last"] = time.perf_counter()

            handle = register_optimizer_step_post_hook(hook)
            try:
                trained = _train(name, model, problem, steps, seed)
            finally:
                handle.remove()
            mm.load_models_gpu([trained])
            final = ts.evaluate(problem, trained.model)
            mm.load_models_gpu([model])
            state["curve"].append((steps, final["loss"]))
            record = {
                "config": name,
                "seed": seed,
                "steps": state["step"],
                "s_per_step": statistics.median(state["intervals"]),
                "curve": state["curve"],
                **final,
            }
            with open(out, "a") as handle_out:
                handle_out.write(json.dumps(record) + "\n")


def _train(name: str, model, problem, steps: int, seed: int):
    from lumina_turbo.devtools import teacher_student as ts

    if name == TRAINLORANODE:
        import torch
        from comfy_extras.nodes_train import TrainLoraNode

        data = problem.train
        latents = [{"samples": data.latent(i)[None]} for i in range(len(data))]
        positive = [[[data.text(i)[None], {}]] for i in range(len(data))]  # each latent its own caption
        torch.manual_seed(seed)  # its timesteps and batch order come from the global generator
        with torch.inference_mode():  # as in ComfyUI's executor
            output = TrainLoraNode.execute(
                model=[model],
                latents=latents,
                positive=positive,
                batch_size=[1],
                steps=[steps],
                grad_accumulation_steps=[1],
                learning_rate=[LR[problem.family]],
                rank=[RANK],
                optimizer=["AdamW"],
                loss_function=["MSE"],
                seed=[seed],
                training_dtype=["fp32"],
                lora_dtype=["fp32"],
                algorithm=["LoRA"],
                gradient_checkpointing=[False],
                existing_lora=["[None]"],
            )
        return output.args[0]
    from lumina_turbo.training.config import TrainConfig
    from lumina_turbo.training.engine import LoraTrainer

    config = TrainConfig(
        max_train_steps=steps,
        learning_rate=LR[problem.family],
        network_dim=RANK,
        network_alpha=float(RANK),
        mixed_precision="fp32",
        gradient_checkpointing=False,
        turbo_steps=8,
        save_every_n_steps=0,
        seed=seed,
        **CONFIGS[name][1],
    )
    result = LoraTrainer(config, model, problem.train).run()
    return ts.with_lora(model, result.lora)


def _spawn(args: list[str], timeout: int = 3600) -> str:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child {args[:3]} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _stats(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "values": [round(v, 4) for v in values],
    }


def _at_time(run: dict, seconds: float) -> tuple[float, bool]:
    """The run's velocity gap closed after ``seconds`` of training (linear in steps between evaluations);
    True: the run had done all its steps sooner (its final value is used; it could have trained on)."""
    steps = seconds / run["s_per_step"]
    points = [(0, 0.0), *[(s, v) for s, v in run["curve"]]]
    if steps >= points[-1][0]:
        return points[-1][1], steps > points[-1][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if s0 <= steps <= s1:
            return v0 + (v1 - v0) * (steps - s0) / (s1 - s0), False
    return 0.0, False


def summarise(family: str, runs: list[dict]) -> dict:
    by_config: dict[str, list[dict]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(run)
    budget = statistics.median(r["s_per_step"] * r["steps"] for r in by_config["default"])
    out = {"equal_time_budget_s": round(budget, 2)}
    for name, group in by_config.items():
        # the default defines the budget: its equal-time value is its value after all its steps
        timed = [(r["loss"], False) if name == "default" else _at_time(r, budget) for r in group]
        out[name] = {
            "label": LABELS[name],
            **{
                key: _stats([r[key] for r in group])
                for key in ("loss", "fidelity_4", "fidelity_8", "fidelity_30")
            },
            "s_per_step": _stats([r["s_per_step"] for r in group]),
            "equal_time_loss": _stats([v for v, _ in timed]),
            "equal_time_finished_early": sum(early for _, early in timed),
            "curve": _curve(group),
        }
    return out


def _curve(group: list[dict]) -> list[dict]:
    steps = [s for s, _ in group[0]["curve"]]
    return [
        {"step": s, **_stats([dict(r["curve"])[s] for r in group])}
        for s in steps
        if all(s in dict(r["curve"]) for r in group)
    ]


def _pct(stats: dict) -> str:
    return f"{100 * stats['mean']:.0f} % ({100 * stats['min']:.0f}..{100 * stats['max']:.0f})"


def table(summary: dict) -> str:
    rows = []
    for family, data in summary.items():
        rows += [
            f"**{family}** ({data['problem']['train_items']} training latents, {STEPS.get(family)} steps; equal "
            f"wall time = {data['equal_time_budget_s']} s, the default's median time for all its steps; "
            "gap closed: mean (min..max) over 3 seeds)",
            "",
            "| configuration | velocity @ steps | fid 4 | fid 8 | fid 30 | velocity @ equal time | s/step |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in FAMILY_CONFIGS[family]:
            if name not in data:
                continue
            row = data[name]
            early = row["equal_time_finished_early"]
            bound = f"{early}/{len(row['loss']['values'])}* " if early else ""
            rows.append(
                f"| {row['label']} | {_pct(row['loss'])} | {_pct(row['fidelity_4'])} | {_pct(row['fidelity_8'])} | "
                f"{_pct(row['fidelity_30'])} | {bound}{_pct(row['equal_time_loss'])} | "
                f"{row['s_per_step']['mean']:.3f} |"
            )
        rows.append("")
    return "\n".join(rows)


def verdicts(summary: dict) -> list[str]:
    """The answers the benchmark exists for, with 'no difference' where the seed ranges overlap."""

    def compare(family, a, b, key):
        x, y = summary[family][a][key], summary[family][b][key]
        if x["min"] > y["max"]:
            word = "better"
        elif x["max"] < y["min"]:
            word = "worse"
        else:
            word = "no difference beyond the seed spread"
        return f"{LABELS[a]} vs {LABELS[b]} on {key}: {_pct(x)} vs {_pct(y)} -> {word}"

    out = []
    for family, data in summary.items():
        for key in ("fidelity_8", "fidelity_4", "fidelity_30", "loss"):
            if "uniform" in data:
                out.append(f"{family}: " + compare(family, "default", "uniform", key))
        for mode in ("frequency", "style", "unified"):
            if mode in data:
                out.append(f"{family}: " + compare(family, mode, "default", "loss"))
        if TRAINLORANODE in data:
            out.append(f"{family}: " + compare(family, "default", TRAINLORANODE, "loss"))
            out.append(f"{family}: " + compare(family, "default", TRAINLORANODE, "equal_time_loss"))
    return out


def run() -> dict:
    families = ["real"] if real_weights() else ["lumina2", "zimage"]
    summary, raw = {}, {}
    workdir = tempfile.mkdtemp(prefix="lt-bench-quality-")  # kept when a child fails: its runs so far
    for family in families:
        steps = int(os.environ.get("STEPS", STEPS[family]))
        problem_file, cache = f"{workdir}/{family}.safetensors", f"{workdir}/cache-{family}"
        problem = json.loads(_spawn(["--problem", family, problem_file, cache]).strip().splitlines()[-1])
        out = f"{workdir}/{family}.jsonl"
        ours = [c for c in FAMILY_CONFIGS[family] if c != TRAINLORANODE]
        _spawn(["--train", family, ",".join(ours), problem_file, cache, str(steps), out])
        _spawn(["--train", family, TRAINLORANODE, problem_file, cache, str(steps), out])
        runs = [json.loads(line) for line in Path(out).read_text().splitlines()]
        raw[family] = runs
        summary[family] = {"problem": problem, **summarise(family, runs)}
    shutil.rmtree(workdir, ignore_errors=True)
    from benchmarks.quality_plot import write_plot

    plot = write_plot(summary, REPO / "docs" / "images" / "training_quality.png")
    answers = verdicts(summary)
    return {
        "table": table(summary) + "\n" + "\n".join(f"- {a}" for a in answers),
        "verdicts": answers,
        "summary": summary,
        "runs": raw,
        "plot": str(plot.relative_to(REPO)),
        "setup": {
            "seeds": SEEDS,
            "rank": RANK,
            "learning_rate": LR,
            "curvature_weight": 0.05,
            "batch_size": 1,
            "latent": LATENT,
            "steps": STEPS,
            "threads": 1,
            "real_weights": real_weights(),
            "machine": "shared 2-core CPU, other jobs running: wall times are noisy",
        },
    }


def resummarise(path: Path) -> dict:
    """Summary, table, verdicts and plot again from a results file's raw runs (same run, same figures)."""
    result = json.loads(path.read_text())
    summary = {
        family: {"problem": result["summary"][family]["problem"], **summarise(family, runs)}
        for family, runs in result["runs"].items()
    }
    from benchmarks.quality_plot import write_plot

    write_plot(summary, REPO / result["plot"])
    answers = verdicts(summary)
    result.update(
        summary=summary, verdicts=answers, table=table(summary) + "\n" + "\n".join(f"- {a}" for a in answers)
    )
    return result


if __name__ == "__main__":
    if sys.argv[1] == "--resummarise":
        target = Path(sys.argv[2])
        target.write_text(json.dumps(resummarise(target), indent=1, default=str))
    elif sys.argv[1] == "--problem":
        print(json.dumps(_problem_child(*sys.argv[2:5])))
    elif sys.argv[1] == "--train":
        family, which, path, cache, steps, out = sys.argv[2:8]
        _train_child(family, which, path, cache, int(steps), out)
    else:
        print(json.dumps(run(), indent=1, default=str))
