"""LTSaveLora's diffusers (PEFT) export is the same LoRA as the native file: through our LTLoraLoader,
and merged by diffusers' module names into the diffusers transformer it was made for (diffusers' own
LoRA key conversion reads the file)."""

import copy

import pytest
import torch

from lumina_turbo.devtools.comfy_host import bootstrap

bootstrap()

from lumina_turbo.devtools import tiny_transformers  # noqa: E402
from lumina_turbo.loading import nextdit_build, nextdit_config, nextdit_keys  # noqa: E402
from lumina_turbo.lora import apply as lora_apply  # noqa: E402
from lumina_turbo.training import lora, save  # noqa: E402

CAP_LEN = 7
MAKERS = {
    "lumina2": tiny_transformers.tiny_lumina2_transformer,
    "zimage": tiny_transformers.tiny_zimage_transformer,
}


class Twin:
    """A tiny diffusers transformer and the ComfyUI NextDiT built from the same weights."""

    def __init__(self, family):
        self.family = family
        self.diffusers = MAKERS[family](seed=0)
        unet_config = nextdit_config.unet_config_from_diffusers_config(dict(self.diffusers.config))
        self.patcher = nextdit_build.build_nextdit(
            nextdit_keys.diffusers_to_comfy(self.diffusers.state_dict()), unet_config
        )
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, 16, 8, 8, generator=g)
        self.ctx = torch.randn(1, CAP_LEN, unet_config["cap_feat_dim"], generator=g)
        self.sigma = torch.tensor([0.6])

    @torch.no_grad()
    def comfy_velocity(self, patcher):
        """The flow velocity (diffusers sign) of a ComfyUI MODEL, its patches applied."""
        import comfy.model_management as mm

        mm.load_models_gpu([patcher])
        return -patcher.model.diffusion_model(self.x, self.sigma, self.ctx, CAP_LEN)

    @torch.no_grad()
    def diffusers_velocity(self, model):
        t = 1 - self.sigma
        if self.family == "lumina2":
            mask = torch.ones(self.ctx.shape[:2], dtype=torch.bool)
            return model(self.x, t, self.ctx, mask, return_dict=False)[0]
        out = model(list(self.x.unsqueeze(2).unbind(0)), t, list(self.ctx.unbind(0)), return_dict=False)[0]
        return torch.stack(out).squeeze(2)


@pytest.fixture(scope="module", params=["lumina2", "zimage"])
def twin(request):
    return Twin(request.param)


def random_lora(twin, rank=4, alpha=2.0):
    """Non-zero LoRA on every target the trainer offers (refiners and adaLN too); alpha != rank."""
    dm = twin.patcher.model.diffusion_model
    adapters = lora.create_adapters(
        dm, lora.select_targets(dm, adaln=True, refiners=True), rank, alpha, seed=3
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=g) * 0.2)
    return lora.TrainedLora(lora.lora_state_dict(adapters), {save.FAMILY_KEY: twin.family})


def rel_err(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def merge_peft_into(model, state_dict):
    """W += lora_B @ lora_A on the diffusers module each key names (PEFT scale 1: no alpha in the file)."""
    merged = copy.deepcopy(model)
    used = set()
    with torch.no_grad():
        for key in state_dict:
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                up_key = key.replace(".lora_A.", ".lora_B.")
                merged.get_submodule(name).weight += state_dict[up_key].float() @ state_dict[key].float()
                used |= {key, up_key}
    assert used == set(state_dict), sorted(set(state_dict) - used)[:4]
    return merged


def test_diffusers_export_is_the_same_lora(twin, tmp_path):
    import comfy.sd
    import comfy.utils
    from diffusers.loaders.lora_pipeline import Lumina2LoraLoaderMixin, ZImageLoraLoaderMixin

    trained = random_lora(twin)
    native = save.save_lora_file(trained, tmp_path, "native", dtype="fp32", key_format="comfyui")
    exported = save.save_lora_file(trained, tmp_path, "peft", dtype="fp32", key_format="diffusers")
    keys = comfy.utils.load_torch_file(str(exported))
    assert not any(k.endswith(".alpha") for k in keys) and all(k.startswith("transformer.") for k in keys)
    assert "transformer.layers.0.attention.to_k.lora_B.weight" in keys or (
        "transformer.layers.0.attn.to_k.lora_B.weight" in keys
    )

    base = twin.comfy_velocity(twin.patcher)
    reference, _ = comfy.sd.load_lora_for_models(
        twin.patcher, None, comfy.utils.load_torch_file(str(native)), 1, 0
    )
    expected = twin.comfy_velocity(reference)
    assert rel_err(base, expected) > 0.05, "the LoRA must change the output, or this test sees nothing"

    # our loader: the same patched model from either file
    for path in (native, exported):
        loaded, _, report = lora_apply.apply_lora(twin.patcher, None, path)
        assert not report.unmapped
        assert rel_err(twin.comfy_velocity(loaded), expected) < 1e-5, path.name

    # diffusers reads the file with its own LoRA key conversion; the names are its transformer's modules
    mixin = {"lumina2": Lumina2LoraLoaderMixin, "zimage": ZImageLoraLoaderMixin}[twin.family]
    peft = mixin.lora_state_dict(str(exported))
    diffusers_lora = twin.diffusers_velocity(merge_peft_into(twin.diffusers, peft))
    assert rel_err(diffusers_lora, expected) < 1e-4
    assert rel_err(twin.diffusers_velocity(twin.diffusers), expected) > 0.05


def test_diffusers_export_refuses_what_peft_cannot_hold(tmp_path):
    tensors = {
        "diffusion_model.layers.0.attention.out.lora_up.weight": torch.zeros(8, 2),
        "diffusion_model.layers.0.attention.out.lora_down.weight": torch.zeros(2, 8),
    }
    with pytest.raises(ValueError, match="Lumina-2 or Z-Image"):
        save.save_lora_file(lora.TrainedLora(tensors), tmp_path, "x", key_format="diffusers")
    tensors["diffusion_model.layers.0.ffn_norm1.diff"] = torch.zeros(8)
    with pytest.raises(ValueError, match="ffn_norm1.diff.*up/down pair"):
        save.save_lora_file(
            lora.TrainedLora(tensors, {save.FAMILY_KEY: "zimage"}), tmp_path, "x", key_format="diffusers"
        )
    assert not list(tmp_path.iterdir())
