"""Files whose header declares gigabytes are refused from the header, before any tensor is read.

The files are sparse (devtools/oversized_files.py): safetensors accepts them, reading them would
allocate every declared byte. The process's peak memory must not grow by anything like that.
"""

from __future__ import annotations

import resource

import pytest
import safetensors.torch

from lumina_turbo.devtools.comfy_host import bootstrap
from lumina_turbo.devtools.oversized_files import write_with_declared
from lumina_turbo.loading.errors import ModelFileError

DECLARED_BYTES = 1_600_000_000
PEAK_GROWTH_LIMIT = 300 << 20  # far below the declared size: nothing of it was read


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # Linux: KiB


@pytest.fixture(scope="module")
def comfy(tiny_models):
    bootstrap()
    return tiny_models


def test_lora_with_a_huge_declared_rank_is_refused_from_its_header(comfy, tmp_path):
    from lumina_turbo.lora.apply import convert_file

    tensors = safetensors.torch.load_file(
        str(comfy / "loras" / "tiny-random-zimage-lora-diffusers.safetensors")
    )
    stem = "transformer.layers.0.attention.to_q"
    up, down = tensors.pop(f"{stem}.lora_B.weight"), tensors.pop(f"{stem}.lora_A.weight")
    rank = DECLARED_BYTES // (4 * (up.shape[0] + down.shape[1]))
    path = write_with_declared(
        tmp_path / "huge_rank.safetensors",
        tensors,
        {
            f"{stem}.lora_A.weight": ("F32", (rank, down.shape[1])),
            f"{stem}.lora_B.weight": ("F32", (up.shape[0], rank)),
        },
    )
    assert path.stat().st_size > DECLARED_BYTES
    before = _peak_bytes()
    with pytest.raises(ModelFileError, match=rf"huge_rank\.safetensors: expected a LoRA rank .* rank {rank}"):
        convert_file(path, tmp_path / "out.safetensors")
    assert _peak_bytes() - before < PEAK_GROWTH_LIMIT
    assert not (tmp_path / "out.safetensors").exists()


def test_transformer_with_a_huge_extra_tensor_is_refused_from_its_header(comfy, tmp_path):
    from lumina_turbo.loading.model_files import load_transformer_file

    tensors = safetensors.torch.load_file(str(comfy / "diffusion_models" / "tiny-random-zimage.safetensors"))
    path = write_with_declared(
        tmp_path / "padded.safetensors", tensors, {"layers.0.attention.junk": ("F32", (DECLARED_BYTES // 4,))}
    )
    before = _peak_bytes()
    with pytest.raises(
        ModelFileError, match=r"padded\.safetensors: .*unexpected \['layers\.0\.attention\.junk'\]"
    ):
        load_transformer_file(path)
    assert _peak_bytes() - before < PEAK_GROWTH_LIMIT
