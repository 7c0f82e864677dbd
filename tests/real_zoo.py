"""Real timm, torchvision and transformers families at small sizes, random weights (nothing
downloaded), for the zoo test: a builder and its example inputs per family.

Each builder returns the real class; ``trained`` moves every parameter off its init and
gives BatchNorm real statistics, so a misplaced entry cannot hide behind gamma 1, beta 0."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def _sweep_module():
    """``tools/zoo_sweep.py``, the broad sweep these families are a selection of: one
    ``trained`` and one builder per shared family for both."""
    path = Path(__file__).resolve().parents[1] / "tools" / "zoo_sweep.py"
    spec = importlib.util.spec_from_file_location("zoo_sweep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_SWEEP = _sweep_module()
trained = _SWEEP.trained  # every parameter off its init, BatchNorm statistics real
_tv_convnext, _tv_vit = _SWEEP._tv_convnext, _SWEEP._tv_vit


@dataclass(frozen=True)
class Family:
    library: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    kwargs: Callable[[tuple], dict] | None = None


def image(size: int, channels: int = 3):
    return lambda g: (torch.randn(2, channels, size, size, generator=g, dtype=torch.float64),)


def tokens(vocab: int = 64, length: int = 6):
    return lambda g: (torch.randint(0, vocab, (2, length), generator=g),)


def _timm(name, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **kw)
    return build


def _timm_class(module, name):
    import importlib

    return getattr(importlib.import_module(f"timm.models.{module}"), name)


def _vit_kw(**kw):
    return dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


def _tv(factory, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, factory)(num_classes=5, **kw)
    return build


_hf, LM = _SWEEP._hf, _SWEEP.LM  # a transformers class from its config; a small LM config
def NO_CACHE(args):  # noqa: N802 - a constant-like kwargs builder
    return {"use_cache": False}

FAMILIES: dict[str, Family] = {
    # timm
    "timm.vit": Family("timm", _timm("vit_tiny_patch16_224", **_vit_kw()), image(32)),
    "timm.deit": Family("timm", _timm("deit_tiny_patch16_224", **_vit_kw()), image(32)),
    "timm.vit_layerscale": Family("timm", _timm("vit_tiny_patch16_224", init_values=0.1,
                                                drop_path_rate=0.1, **_vit_kw()), image(32)),
    "timm.beit": Family("timm", _timm("beit_base_patch16_224", **_vit_kw()), image(32)),
    "timm.convnext": Family("timm", _timm("convnext_atto"), image(32)),
    "timm.resnet": Family("timm", _timm("resnet18"), image(32)),
    "timm.resnet10t": Family("timm", _timm("resnet10t"), image(32)),
    "timm.mobilenetv3": Family("timm", _timm("mobilenetv3_small_050"), image(32)),
    "timm.efficientnet": Family("timm", _timm("efficientnet_b0"), image(32)),
    "timm.regnet": Family("timm", _timm("regnetx_002"), image(32)),
    "timm.seresnext": Family("timm", _timm("seresnext26d_32x4d"), image(32)),
    "timm.poolformer": Family("timm", _timm("poolformer_s12"), image(32)),
    "timm.dla": Family("timm", _timm("dla46_c"), image(32)),
    "timm.swin": Family("timm", _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4,
                                      window_size=4, embed_dim=16, depths=(2, 2),
                                      num_heads=(2, 4)), image(32)),
    "timm.swinv2": Family("timm", _timm("swinv2_tiny_window8_256", img_size=32, patch_size=4,
                                        window_size=4, embed_dim=16, depths=(2, 2),
                                        num_heads=(2, 4)), image(32)),
    "timm.mixer": Family("timm", lambda: _timm_class("mlp_mixer", "MlpMixer")(
        num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32), image(32)),
    # torchvision
    "torchvision.resnet": Family("torchvision", _tv("resnet18"), image(32)),
    "torchvision.mobilenet_v2": Family("torchvision", _tv("mobilenet_v2", width_mult=0.25),
                                       image(32)),
    "torchvision.convnext": Family("torchvision", _tv_convnext, image(32)),
    "torchvision.vit": Family("torchvision", _tv_vit, image(32)),
    "torchvision.regnet": Family("torchvision", _tv("regnet_x_400mf"), image(32)),
    "torchvision.squeezenet": Family("torchvision", _tv("squeezenet1_1"), image(32)),
    "torchvision.shufflenet": Family("torchvision", _tv("shufflenet_v2_x0_5"), image(32)),
    # transformers
    "transformers.llama": Family("transformers", _hf("LlamaConfig", "LlamaForCausalLM",
                                                     num_key_value_heads=2, **LM),
                                 tokens(), NO_CACHE),
    "transformers.qwen2": Family("transformers", _hf("Qwen2Config", "Qwen2ForCausalLM",
                                                     num_key_value_heads=2, **LM),
                                 tokens(), NO_CACHE),
    "transformers.mistral": Family("transformers", _hf("MistralConfig", "MistralForCausalLM",
                                                       num_key_value_heads=2, **LM),
                                   tokens(), NO_CACHE),
    "transformers.gemma": Family("transformers", _hf("GemmaConfig", "GemmaForCausalLM",
                                                     num_key_value_heads=2, head_dim=8, **LM),
                                 tokens(), NO_CACHE),
    "transformers.gemma2": Family("transformers", _hf("Gemma2Config", "Gemma2ForCausalLM",
                                                       num_key_value_heads=2, head_dim=8, **LM),
                                  tokens(), NO_CACHE),
    "transformers.gpt2": Family("transformers", _hf("GPT2Config", "GPT2LMHeadModel",
                                                    vocab_size=64, n_embd=32, n_layer=2,
                                                    n_head=4, n_positions=32),
                                tokens(), NO_CACHE),
    "transformers.gpt_neo": Family("transformers", _hf(
        "GPTNeoConfig", "GPTNeoForCausalLM", vocab_size=64, hidden_size=32, num_layers=2,
        num_heads=4, attention_types=[[["global", "local"], 1]], max_position_embeddings=32,
        window_size=8), tokens(), NO_CACHE),
    "transformers.opt": Family("transformers", _hf(
        "OPTConfig", "OPTForCausalLM", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=32),
        tokens(), NO_CACHE),
    # partial rotary: q[..., :rot] picked by position from a head's dims
    "transformers.phi": Family("transformers", _hf(
        "PhiConfig", "PhiForCausalLM", partial_rotary_factor=0.5, **LM), tokens(), NO_CACHE),
    "transformers.stablelm": Family("transformers", _hf(
        "StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2,
        partial_rotary_factor=0.5, **LM), tokens(), NO_CACHE),
    "transformers.gptj": Family("transformers", _hf(
        "GPTJConfig", "GPTJForCausalLM", vocab_size=64, n_embd=32, n_layer=2, n_head=4,
        rotary_dim=4, n_positions=32), tokens(), NO_CACHE),
    "transformers.bloom": Family("transformers", _hf(  # alibi: pow of created tensors
        "BloomConfig", "BloomForCausalLM", vocab_size=64, hidden_size=32, n_layer=2,
        n_head=4), tokens(), NO_CACHE),
    # mixtures of experts through batched_mm: transformers' default, grouped_mm, does not
    # run in float64 (test_moe.py grows it in float32); Qwen2-MoE has a shared expert
    "transformers.mixtral": Family("transformers", _hf(
        "MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, experts_implementation="batched_mm", **LM), tokens(),
        NO_CACHE),
    "transformers.qwen2_moe": Family("transformers", _hf(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        experts_implementation="batched_mm", **LM), tokens(), NO_CACHE),
    "transformers.albert": Family("transformers", _hf(  # one layer shared by every block
        "AlbertConfig", "AlbertForMaskedLM", embedding_size=16, **LM), tokens()),
    "transformers.bert": Family("transformers", _hf("BertConfig", "BertForMaskedLM", **LM),
                                tokens()),
    "transformers.vit": Family("transformers", _hf(
        "ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5),
        image(32)),
}
