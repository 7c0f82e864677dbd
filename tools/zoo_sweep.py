"""Sweep a broad zoo of real model families through lemon_fx and report the lossless share.

Measures the table of GitHub issue #14: for every family (the real timm, torchvision and
transformers classes at small sizes, random weights, nothing downloaded) and each of four
plans -- ``Plan(width=2.0)``, ``Plan(width=1.5)``, ``Plan(depth=2.0)`` and
``Plan(width=2.0, depth=2.0)`` -- the model is "trained" (every parameter moved by
0.05 * randn, BatchNorm statistics made real, float64, eval mode), traced with
``lemon_fx.trace``, grown with ``lemon_fx.grow`` and compared with the source on FRESH
inputs (another generator seed), to 1e-10 * (1 + max|want|), or 1e-5 for a model that
computes in float32 somewhere (Hugging Face's RMSNorm).

Each (family, plan) gets one outcome:

* ``lossless``       grown, equal on fresh inputs, and more parameters than the source;
* ``refused: E: ..`` a ``lemon_fx.LemonError`` (its first problem's reason);
* ``WRONG-guard``    grow's own check caught a wrong rule (``VerificationError``);
* ``trace``          ``lemon_fx.trace`` refused the model (``TraceError``);
* ``WRONG``          grow returned but the outputs differ -- the worst outcome;
* ``CRASH``          any other exception from trace, grow or running the grown model;
* ``SAME-SIZE``      equal, but the grown model has no more parameters than the source;
* ``TIMEOUT``        the case ran past ``--case-timeout`` seconds.

Command (everything: 124 families, about 15 minutes on 2 otherwise idle cores)::

    python tools/zoo_sweep.py --json /tmp/zoo_sweep.json
    python tools/zoo_sweep.py --families timm.vit llama --plans width2 depth2
    python tools/zoo_sweep.py --build-only          # only check that every family builds/runs

``--json`` writes ``{family: {plan: outcome}, "_summary": {...}}``; the summary holds the
lossless share per plan against the aim, every WRONG/CRASH case and the refusal reasons
grouped by their text (node names and numbers taken out), largest group first.

Left out (a build failure is not a lemon_fx outcome):
  transformers XGLM: fails in plain PyTorch in float64 (its eager attention builds
    ``torch.full((), finfo(float64).min)`` as a float32 tensor: overflow);
  torchvision vgg / alexnet / inception_v3: their hard-coded 4096-wide classifiers (or 24M
    parameters at a 75x75 minimum input) are too heavy in float64 at 4x for the sweep.
Sizes are small but keep two blocks in some stage where the class allows, so that a depth
plan has a block it can copy (a stage of one shape-changing block cannot grow in depth).
The MoE families use ``experts_implementation="batched_mm"`` (the eager loop over
``nonzero`` does not trace; ``grouped_mm`` does not run in float64).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lemon_fx  # noqa: E402
from lemon_fx.tracing.graph_facts import computed_dtypes  # noqa: E402

PLANS = {
    "width2": lambda: lemon_fx.Plan(width=2.0),
    "width1.5": lambda: lemon_fx.Plan(width=1.5),
    "depth2": lambda: lemon_fx.Plan(depth=2.0),
    "width2+depth2": lambda: lemon_fx.Plan(width=2.0, depth=2.0),
}
AIMS = {"width2": 0.90, "width1.5": 0.60, "depth2": 0.70, "width2+depth2": 0.65}
OK = "lossless"
REASON_CHARS = 110


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    kwargs: dict = field(default_factory=dict)


def image(size: int, channels: int = 3, batch: int = 2):
    return lambda g: (torch.randn(batch, channels, size, size, generator=g,
                                  dtype=torch.float64),)


def tokens(vocab: int = 64, length: int = 8, low: int = 0):
    return lambda g: (torch.randint(low, vocab, (2, length), generator=g),)


def trained(model: torch.nn.Module, dtype: torch.dtype = torch.float64,
            scale: float = 0.05) -> torch.nn.Module:
    """``model`` in ``dtype``, eval mode, every parameter moved by ``scale * randn``,
    BatchNorm running statistics made real (so no entry hides behind an identity init)."""
    model = model.to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator, dtype=b.dtype))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator, dtype=b.dtype))
    return model


# ---- timm


def _timm(name: str, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **kw)
    return build


def _timm_class(module: str, cls: str, **kw):
    def build():
        import importlib

        timm_module = importlib.import_module(f"timm.models.{module}")
        resolved = {k: getattr(timm_module, v[1:]) if isinstance(v, str) and v.startswith("@")
                    else v for k, v in kw.items()}
        return getattr(timm_module, cls)(num_classes=5, **resolved)
    return build


def _timm_regnet(se_ratio: float):
    def build():
        from timm.models.regnet import RegNet, RegNetCfg

        # stages of 1, 1, 3, 3 blocks
        return RegNet(RegNetCfg(w0=16, wa=16.0, wm=2.0, group_size=8, depth=8, stem_width=16,
                                se_ratio=se_ratio), num_classes=5)
    return build


def _timm_efficientnet_b0():
    from timm.models.efficientnet import _gen_efficientnet

    # efficientnet_b0's own generator at a quarter of its channels (create_model fixes 1.0)
    return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, pretrained=False,
                             num_classes=5)


SMALL_RESNET = dict(channels=(16, 32, 64, 128), stem_width=16)


def _vit(**kw):
    return dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


def _stages(dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), **kw):
    return dict(dims=dims, depths=depths, **kw)


TIMM: dict[str, Family] = {
    "timm.vit": Family(_timm("vit_tiny_patch16_224", **_vit()), image(32)),
    "timm.vit_reg_gap": Family(_timm("vit_base_patch16_reg4_gap_256", **_vit()), image(32)),
    "timm.vit_relpos": Family(_timm("vit_relpos_small_patch16_224", **_vit()), image(32)),
    "timm.deit": Family(_timm("deit_tiny_patch16_224", **_vit()), image(32)),
    "timm.deit3": Family(_timm("deit3_small_patch16_224", **_vit()), image(32)),
    "timm.beit": Family(_timm("beit_base_patch16_224", **_vit()), image(32)),
    "timm.eva02": Family(_timm("eva02_tiny_patch14_224", **_vit()), image(32)),
    "timm.cait": Family(_timm("cait_xxs24_224", depth_token_only=1, **_vit()), image(32)),
    "timm.xcit": Family(_timm("xcit_nano_12_p8_224", eta=1.0, cls_attn_layers=1, **_vit()),
                        image(32)),
    "timm.mixer": Family(_timm_class("mlp_mixer", "MlpMixer", img_size=32, patch_size=8,
                                     num_blocks=2, embed_dim=32), image(32)),
    "timm.resmlp": Family(_timm_class("mlp_mixer", "MlpMixer", img_size=32, patch_size=8,
                                      num_blocks=2, embed_dim=32, mlp_ratio=4,
                                      block_layer="@ResBlock", norm_layer="@Affine"),
                          image(32)),
    "timm.convnext": Family(_timm("convnext_atto", **_stages()), image(32)),
    "timm.convnextv2": Family(_timm("convnextv2_atto", **_stages()), image(32)),
    "timm.resnet": Family(_timm("resnet18", **SMALL_RESNET), image(32)),
    "timm.resnet10t": Family(_timm("resnet10t", channels=(16, 32, 64, 128)), image(32)),
    "timm.resnext": Family(_timm("resnext50_32x4d", layers=(2, 2, 2, 2), cardinality=8,
                                 base_width=16, **SMALL_RESNET), image(32)),
    "timm.seresnext": Family(_timm("seresnext26d_32x4d", cardinality=8, base_width=16,
                                   **SMALL_RESNET), image(32)),
    "timm.regnetx": Family(_timm_regnet(0.0), image(32)),
    "timm.regnety": Family(_timm_regnet(0.25), image(32)),
    "timm.efficientnet": Family(_timm_efficientnet_b0, image(32)),
    "timm.efficientnetv2": Family(_timm("tf_efficientnetv2_b0", channel_multiplier=0.25,
                                        depth_multiplier=0.5), image(32)),
    "timm.mobilenetv3": Family(_timm("mobilenetv3_small_050"), image(32)),
    "timm.mobilenetv4": Family(_timm("mobilenetv4_conv_small_035"), image(32)),
    "timm.ghostnet": Family(_timm("ghostnet_050"), image(32)),
    "timm.dla": Family(_timm("dla46_c"), image(32)),
    "timm.densenet": Family(_timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)),
                            image(32)),
    "timm.hrnet": Family(_timm("hrnet_w18_small"), image(64)),
    "timm.coatnet": Family(_timm("test_coatnet", img_size=64), image(64)),
    "timm.maxvit": Family(_timm("test_maxvit", img_size=64), image(64)),
    "timm.edgenext": Family(_timm("edgenext_xx_small", depths=(1, 1, 2, 1),
                                   dims=(16, 32, 48, 64)), image(64)),
    "timm.fastvit": Family(_timm("fastvit_t8", layers=(1, 1, 1, 1)), image(64)),
    "timm.poolformer": Family(_timm_class("metaformer", "MetaFormer", downsample_norm=None,
                                          mlp_act=torch.nn.GELU, mlp_bias=True,
                                          norm_layers="@GroupNorm1",
                                          layer_scale_init_values=1e-5,
                                          res_scale_init_values=None, use_mlp_head=False,
                                          **_stages()), image(32)),
    "timm.poolformerv2": Family(_timm_class("metaformer", "MetaFormer",
                                            norm_layers="@GroupNorm1NoBias",
                                            use_mlp_head=False, **_stages()), image(32)),
    "timm.swin": Family(_timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4,
                              window_size=4, embed_dim=16, depths=(1, 1),
                              num_heads=(2, 4)), image(32)),
    "timm.swinv2": Family(_timm("swinv2_tiny_window8_256", img_size=32, patch_size=4,
                                window_size=4, embed_dim=16, depths=(1, 1),
                                num_heads=(2, 4)), image(32)),
    "timm.nfnet": Family(_timm("test_nfnet"), image(32)),
    "timm.levit": Family(_timm("levit_128s", img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                               num_heads=(2, 3, 4), depth=(2, 2, 2)), image(64)),
    "timm.pvt_v2": Family(_timm("pvt_v2_b0", depths=(1, 1, 2, 1), embed_dims=(16, 32, 48, 64),
                                num_heads=(1, 2, 2, 4)), image(64)),
    "timm.mobilevit": Family(_timm("mobilevit_xxs"), image(64)),
    "timm.rexnet": Family(_timm("rexnet_100"), image(32)),
    "timm.repvgg": Family(_timm("repvgg_a0"), image(32)),
    "timm.mambaout": Family(_timm("test_mambaout"), image(32)),
    "timm.byobnet": Family(_timm("test_byobnet"), image(32)),
    "timm.inception_next": Family(_timm("inception_next_atto", depths=(1, 1, 2, 1),
                                         dims=(16, 32, 48, 64)), image(32)),
}


# ---- torchvision


def _tv(factory: str, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, factory)(num_classes=5, **kw)
    return build


def _tv_resnet(block: str, layers=(2, 2, 2, 2), **kw):
    def build():
        from torchvision.models import resnet

        return resnet.ResNet(getattr(resnet, block), layers, num_classes=5, **kw)
    return build


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)],
                    stochastic_depth_prob=0.1, num_classes=5)


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=5)


def _tv_swin(v2: bool):
    def build():
        from torchvision.models import swin_transformer as sw

        extra = dict(block=sw.SwinTransformerBlockV2,
                     downsample_layer=sw.PatchMergingV2) if v2 else {}
        return sw.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                  num_heads=[2, 4], window_size=[4, 4], num_classes=5,
                                  **extra)
    return build


def _tv_maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4,
                  block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                  stochastic_depth_prob=0.0, num_classes=5)


def _tv_efficientnet(v2: bool):
    def build():
        from functools import partial

        from torchvision.models import efficientnet as ef

        if v2:
            setting = [ef.FusedMBConvConfig(1, 3, 1, 8, 8, 2),
                       ef.FusedMBConvConfig(4, 3, 2, 8, 16, 2),
                       ef.MBConvConfig(4, 3, 2, 16, 24, 2, width_mult=1.0, depth_mult=1.0)]
            return ef.EfficientNet(setting, dropout=0.2, last_channel=64, num_classes=5,
                                   norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3))
        setting, last = ef._efficientnet_conf("efficientnet_b0", width_mult=0.25,
                                              depth_mult=0.25)
        return ef.EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=5)
    return build


def _tv_regnet(se: float):
    def build():
        from torchvision.models.regnet import BlockParams, RegNet

        params = BlockParams.from_init_params(depth=8, w_0=16, w_a=16.0, w_m=2.0,
                                              group_width=8, se_ratio=se or None)
        return RegNet(params, num_classes=5, stem_width=16)
    return build


def _tv_densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)


TORCHVISION: dict[str, Family] = {
    "torchvision.resnet": Family(_tv("resnet18"), image(32)),
    "torchvision.resnet_bottleneck": Family(_tv_resnet("Bottleneck"), image(32)),
    "torchvision.resnext": Family(_tv_resnet("Bottleneck", groups=32, width_per_group=4),
                                  image(32)),
    "torchvision.wide_resnet": Family(_tv_resnet("Bottleneck", (1, 2, 1, 1), width_per_group=128),
                                      image(32)),
    "torchvision.mobilenet_v2": Family(_tv("mobilenet_v2", width_mult=0.25), image(32)),
    "torchvision.mobilenet_v3_small": Family(_tv("mobilenet_v3_small", width_mult=0.25),
                                             image(32)),
    "torchvision.mobilenet_v3_large": Family(_tv("mobilenet_v3_large", width_mult=0.25),
                                             image(32)),
    "torchvision.efficientnet": Family(_tv_efficientnet(False), image(32)),
    "torchvision.efficientnet_v2": Family(_tv_efficientnet(True), image(32)),
    "torchvision.convnext": Family(_tv_convnext, image(32)),
    "torchvision.vit": Family(_tv_vit, image(32)),
    "torchvision.swin": Family(_tv_swin(False), image(32)),
    "torchvision.swin_v2": Family(_tv_swin(True), image(32)),
    "torchvision.maxvit": Family(_tv_maxvit, image(64)),
    "torchvision.regnet_x": Family(_tv_regnet(0.0), image(32)),
    "torchvision.regnet_y": Family(_tv_regnet(0.25), image(32)),
    "torchvision.shufflenet": Family(_tv("shufflenet_v2_x0_5"), image(32)),
    "torchvision.squeezenet": Family(_tv("squeezenet1_1"), image(32)),
    "torchvision.mnasnet": Family(_tv("mnasnet0_5"), image(32)),
    "torchvision.densenet": Family(_tv_densenet, image(32)),
    "torchvision.googlenet": Family(_tv("googlenet", aux_logits=False, init_weights=False),
                                    image(32)),
}


# ---- transformers


def _hf(config_name: str, model_name: str, **kw):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**kw)
        return getattr(transformers, model_name)(config)
    return build


LM = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64, max_position_embeddings=32)
GQA = dict(LM, num_key_value_heads=2)
NO_CACHE = {"use_cache": False}
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=64)


def _causal(config_name: str, model_name: str, **kw):
    return Family(_hf(config_name, model_name, **kw), tokens(), NO_CACHE)


TRANSFORMERS: dict[str, Family] = {
    # decoder-only language models
    "transformers.llama": _causal("LlamaConfig", "LlamaForCausalLM", **GQA),
    "transformers.mistral": _causal("MistralConfig", "MistralForCausalLM", **GQA),
    "transformers.qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", **GQA),
    "transformers.qwen3": _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **GQA),
    "transformers.gemma": _causal("GemmaConfig", "GemmaForCausalLM", head_dim=8, **GQA),
    "transformers.gemma2": _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8,
                                   sliding_window=4, **GQA),
    "transformers.gemma3": _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8,
                                   sliding_window=4, **GQA),
    "transformers.phi": _causal("PhiConfig", "PhiForCausalLM", **LM),
    "transformers.phi3": _causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **GQA),
    "transformers.stablelm": _causal("StableLmConfig", "StableLmForCausalLM", **GQA),
    "transformers.gpt2": _causal("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=32,
                                 n_layer=2, n_head=4, n_positions=32),
    "transformers.gpt_neo": _causal("GPTNeoConfig", "GPTNeoForCausalLM", vocab_size=64,
                                    hidden_size=32, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]],
                                    max_position_embeddings=32, window_size=4),
    "transformers.gptj": _causal("GPTJConfig", "GPTJForCausalLM", vocab_size=64, n_embd=32,
                                 n_layer=2, n_head=4, rotary_dim=4, n_positions=32),
    "transformers.gpt_neox": _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.5,
                                     **LM),
    "transformers.opt": _causal("OPTConfig", "OPTForCausalLM", vocab_size=64, hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                max_position_embeddings=32, word_embed_proj_dim=32),
    "transformers.bloom": _causal("BloomConfig", "BloomForCausalLM", vocab_size=64,
                                  hidden_size=32, n_layer=2, n_head=4),
    "transformers.falcon": _causal("FalconConfig", "FalconForCausalLM", vocab_size=64,
                                   hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=32),
    "transformers.olmo": _causal("OlmoConfig", "OlmoForCausalLM", **GQA),
    "transformers.olmo2": _causal("Olmo2Config", "Olmo2ForCausalLM", **GQA),
    "transformers.cohere": _causal("CohereConfig", "CohereForCausalLM", **GQA),
    "transformers.granite": _causal("GraniteConfig", "GraniteForCausalLM", **GQA),
    "transformers.starcoder2": _causal("Starcoder2Config", "Starcoder2ForCausalLM", **GQA),
    "transformers.codegen": _causal("CodeGenConfig", "CodeGenForCausalLM", vocab_size=64,
                                    n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                    n_positions=32, n_ctx=32),
    "transformers.biogpt": _causal("BioGptConfig", "BioGptForCausalLM", **LM),
    "transformers.gpt_bigcode": _causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                                        vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                        n_positions=32, multi_query=True),
    "transformers.smollm3": _causal("SmolLM3Config", "SmolLM3ForCausalLM", pad_token_id=0,
                                    **GQA),
    "transformers.nemotron": _causal("NemotronConfig", "NemotronForCausalLM", **GQA),
    "transformers.persimmon": _causal("PersimmonConfig", "PersimmonForCausalLM", **LM),
    "transformers.qwen3_moe": _causal("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8,
                                      num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32,
                                      experts_implementation="batched_mm", **GQA),
    "transformers.olmoe": _causal("OlmoeConfig", "OlmoeForCausalLM", num_experts=4,
                                  num_experts_per_tok=2, experts_implementation="batched_mm",
                                  **GQA),
    "transformers.mpt": _causal("MptConfig", "MptForCausalLM", vocab_size=64, d_model=32,
                                n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32),
    "transformers.mixtral": _causal("MixtralConfig", "MixtralForCausalLM",
                                    num_local_experts=4, num_experts_per_tok=2,
                                    experts_implementation="batched_mm", **GQA),
    "transformers.qwen2_moe": _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64,
                                      experts_implementation="batched_mm", **GQA),
    "transformers.mamba": _causal("MambaConfig", "MambaForCausalLM", vocab_size=64,
                                  hidden_size=32, state_size=4, num_hidden_layers=2,
                                  expand=2, conv_kernel=4),
    # encoders and encoder-decoders
    "transformers.bert": Family(_hf("BertConfig", "BertForMaskedLM", **LM), tokens()),
    "transformers.roberta": Family(_hf("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1,
                                       **dict(LM, max_position_embeddings=40)),
                                   tokens(low=2)),
    "transformers.xlm_roberta": Family(_hf("XLMRobertaConfig", "XLMRobertaForMaskedLM",
                                           pad_token_id=1,
                                           **dict(LM, max_position_embeddings=40)),
                                       tokens(low=2)),
    "transformers.mpnet": Family(_hf("MPNetConfig", "MPNetForMaskedLM", pad_token_id=1,
                                     **dict(LM, max_position_embeddings=40)), tokens(low=2)),
    "transformers.albert": Family(_hf("AlbertConfig", "AlbertForMaskedLM", embedding_size=16,
                                      **LM), tokens()),
    "transformers.deberta_v2": Family(_hf("DebertaV2Config", "DebertaV2ForMaskedLM",
                                          **LM), tokens()),
    "transformers.distilbert": Family(_hf("DistilBertConfig", "DistilBertForMaskedLM",
                                          vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                          hidden_dim=64, max_position_embeddings=32),
                                      tokens()),
    "transformers.electra": Family(_hf("ElectraConfig", "ElectraForMaskedLM",
                                       embedding_size=16, **LM), tokens()),
    "transformers.roformer": Family(_hf("RoFormerConfig", "RoFormerForMaskedLM",
                                        embedding_size=32, **LM), tokens()),
    "transformers.modernbert": Family(_hf("ModernBertConfig", "ModernBertForMaskedLM",
                                          global_attn_every_n_layers=2, local_attention=4,
                                          pad_token_id=0, **LM), tokens()),
    "transformers.esm": Family(_hf("EsmConfig", "EsmForMaskedLM", pad_token_id=1,
                                   position_embedding_type="rotary", **LM), tokens(low=2)),
    "transformers.t5_encoder": Family(_hf("T5Config", "T5EncoderModel", vocab_size=64,
                                          d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                          num_heads=4), tokens()),
    "transformers.bart": Family(_hf("BartConfig", "BartForConditionalGeneration",
                                    vocab_size=64, d_model=32, encoder_layers=2,
                                    decoder_layers=2, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=32),
                                tokens(), NO_CACHE),
    # vision
    "transformers.vit": Family(_hf("ViTConfig", "ViTForImageClassification", num_labels=5,
                                   **VIT), image(32)),
    "transformers.deit": Family(_hf("DeiTConfig", "DeiTForImageClassification", num_labels=5,
                                    **VIT), image(32)),
    "transformers.beit": Family(_hf("BeitConfig", "BeitForImageClassification", num_labels=5,
                                    **VIT), image(32)),
    "transformers.dinov2": Family(_hf("Dinov2Config", "Dinov2Model", **VIT), image(32)),
    "transformers.clip_vision": Family(_hf("CLIPVisionConfig", "CLIPVisionModel", **VIT),
                                       image(32)),
    "transformers.siglip_vision": Family(_hf("SiglipVisionConfig", "SiglipVisionModel",
                                             **VIT), image(32)),
    "transformers.clip_text": Family(_hf("CLIPTextConfig", "CLIPTextModel", **LM), tokens()),
    "transformers.swin": Family(_hf("SwinConfig", "SwinForImageClassification", image_size=32,
                                    patch_size=4, embed_dim=16, depths=[1, 1],
                                    num_heads=[2, 4], window_size=4, num_labels=5),
                                image(32)),
    "transformers.convnext": Family(_hf("ConvNextConfig", "ConvNextForImageClassification",
                                        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                        num_labels=5), image(32)),
    "transformers.swinv2": Family(_hf("Swinv2Config", "Swinv2ForImageClassification",
                                      image_size=32, patch_size=4, embed_dim=16,
                                      depths=[1, 1], num_heads=[2, 4], window_size=4,
                                      num_labels=5), image(32)),
    "transformers.segformer": Family(_hf("SegformerConfig", "SegformerForImageClassification",
                                         num_encoder_blocks=2, depths=[1, 1],
                                         sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                         patch_sizes=[7, 3], strides=[4, 2],
                                         num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                         num_labels=5), image(32)),
    "transformers.resnet": Family(_hf("ResNetConfig", "ResNetForImageClassification",
                                      embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                      layer_type="basic", num_labels=5), image(32)),
}

FAMILIES: dict[str, Family] = {**TIMM, **TORCHVISION, **TRANSFORMERS}


# --------------------------------------------------------------------------- one case


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout()


def first_tensor(output):
    """The output a user looks at: a tensor, ``.logits``, ``.last_hidden_state``, or the
    first entry."""
    if isinstance(output, torch.Tensor):
        return output
    for attribute in ("logits", "last_hidden_state"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        return first_tensor(next(iter(output.values())))
    return first_tensor(output[0])


def _short(text: str, limit: int = REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# outcome text -> the normalized full cause it was cut from (for grouping the refusals)
CAUSES: dict[str, str] = {}


def _lemon_outcome(err: lemon_fx.LemonError) -> str:
    problem = err.problems[0] if err.problems else None
    reason = problem.reason if problem else err.message
    op = f"[{problem.op}] " if problem is not None and problem.op else ""
    if isinstance(err, lemon_fx.VerificationError):
        return "WRONG-guard: " + _short(op + reason)
    head = "trace" if isinstance(err, lemon_fx.TraceError) else f"refused: {type(err).__name__}"
    outcome = f"{head}: {_short(op + reason)}"
    cls = "TraceError" if head == "trace" else type(err).__name__
    # the op names the cause of a width refusal (no rule for aten.topk); for a depth refusal
    # it is only the node where a block failed, so it is left out of the group
    key_op = "" if reason.startswith("stack ") else re.sub(r"^\[module [^\]]*\]", "[module]", op)
    CAUSES[outcome] = f"{cls}: {key_op}{normalize(reason)}"
    return outcome


def _crash(where: str, err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" [{Path(frame.filename).name}:{frame.lineno}]" if frame else ""
    return f"CRASH ({where}): {type(err).__name__}: {_short(err, 160)}{at}"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_case(model, gm, spec: Family, plan_name: str) -> str:
    torch.manual_seed(0)
    try:
        big = lemon_fx.grow(gm, PLANS[plan_name]())
    except lemon_fx.LemonError as err:
        return _lemon_outcome(err)
    except CaseTimeout:
        raise
    except Exception as err:  # noqa: BLE001 - every other exception is the outcome
        return _crash("grow", err)
    fresh = spec.inputs(torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            want = first_tensor(model(*fresh, **spec.kwargs))
            got = first_tensor(big(*fresh))
    except CaseTimeout:
        raise
    except Exception as err:  # noqa: BLE001
        return _crash("run grown", err)
    if got.shape != want.shape:
        return f"WRONG: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tolerance = 1e-5 if torch.float32 in computed_dtypes(gm) else 1e-10
    scale = 1 + want.abs().max().item()
    error = (got.to(torch.float64) - want.to(torch.float64)).abs().max().item()
    if not error <= tolerance * scale:  # NaN counts as wrong
        return f"WRONG: max error {error:.3g} (tolerance {tolerance * scale:.3g})"
    if _count(big) <= _count(model):
        return f"SAME-SIZE: {_count(big)} <= {_count(model)} parameters"
    return OK


def run_family(name: str, plans: list[str], case_timeout: int) -> tuple[dict, str]:
    """Outcomes of ``name`` under ``plans``, and a note (parameter count or build error)."""
    spec = FAMILIES[name]
    torch.manual_seed(0)
    try:
        model = trained(spec.build())
        args = spec.inputs(torch.Generator().manual_seed(0))
        with torch.no_grad():
            first_tensor(model(*args, **spec.kwargs))
    except Exception as err:  # noqa: BLE001 - not a lemon_fx outcome
        return {p: "BUILD: " + _short(f"{type(err).__name__}: {err}", 160) for p in plans}, ""
    note = f"{_count(model):,} params"
    signal.alarm(case_timeout)
    try:
        gm = lemon_fx.trace(model, args, spec.kwargs or None)
    except lemon_fx.LemonError as err:
        signal.alarm(0)
        return {p: _lemon_outcome(err) for p in plans}, note
    except CaseTimeout:
        return {p: f"TIMEOUT (trace, {case_timeout}s)" for p in plans}, note
    except Exception as err:  # noqa: BLE001
        signal.alarm(0)
        return {p: _crash("trace", err) for p in plans}, note
    signal.alarm(0)
    outcomes = {}
    for plan in plans:
        signal.alarm(case_timeout)
        try:
            outcomes[plan] = run_case(model, gm, spec, plan)
        except CaseTimeout:
            outcomes[plan] = f"TIMEOUT ({case_timeout}s)"
        finally:
            signal.alarm(0)
        gc.collect()
    return outcomes, note


# --------------------------------------------------------------------------- report


def short_code(outcome: str) -> str:
    if outcome == OK:
        return "ok"
    if outcome.startswith("refused: "):
        cls = outcome.split(":")[1].strip()
        return "ref:" + cls.replace("Error", "").replace("NotLossless", "NotLL")
    return outcome.split(":")[0].split(" (")[0]


def normalize(reason: str) -> str:
    """A refusal's reason with node names, numbers and the 'at N nodes' tail taken out, so
    the same cause at different nodes or sizes counts as one."""
    reason = " ".join(reason.split())
    reason = re.sub(r"\s*\(at \d+ nodes:.*$", "", reason)
    conflict = re.match(r"^\S+ \(\d+ -> \d+ (\w+)\): (.*): (no exact answer.*)$", reason)
    if conflict:  # forms that conflict in one group: the group left out, the needs sorted
        needs = sorted({re.sub(r"\s*\(\d+ nodes?, e\.g\. '[^']*'\)", "", need).strip()
                        for need in conflict.group(2).split("; ")})
        reason = (f"<group> (N -> N {conflict.group(1)}): " + "; ".join(needs) + ": "
                  + conflict.group(3))
    reason = reason.removesuffix("...")
    reason = re.sub(r"'[^' ]*'", "'<x>'", reason)
    reason = re.sub(r"`[^`]*`", "`<x>`", reason)
    reason = re.sub(r"\b(?!e\.g\b)\w+(\.\w+)+\b", "<path>", reason)  # model.layers.0
    reason = re.sub(r"\b\d+(\.\d+)?\b", "N", reason)
    reason = re.sub(r"\[[N, ]*\]|\([N, ]*\)", "<shape>", reason)
    return reason.strip()


def summarize(results: dict[str, dict[str, str]], plans: list[str]) -> dict:
    summary: dict = {"plans": {}, "bad": [], "refusals": []}
    for plan in plans:
        outcomes = [r[plan] for r in results.values() if not r[plan].startswith("BUILD")]
        lossless = sum(o == OK for o in outcomes)
        summary["plans"][plan] = {
            "families": len(outcomes), "lossless": lossless,
            "share": lossless / len(outcomes) if outcomes else 0.0, "aim": AIMS[plan],
            "WRONG": sum(o.startswith("WRONG:") for o in outcomes),
            "WRONG-guard": sum(o.startswith("WRONG-guard") for o in outcomes),
            "CRASH": sum(o.startswith("CRASH") for o in outcomes),
            "TIMEOUT": sum(o.startswith("TIMEOUT") for o in outcomes),
            "trace": sum(o.startswith("trace") for o in outcomes),
            "refused": sum(o.startswith("refused") for o in outcomes),
        }
    groups: dict[str, list[str]] = defaultdict(list)
    for family, per_plan in results.items():
        for plan, outcome in per_plan.items():
            if outcome.startswith(("WRONG", "CRASH", "TIMEOUT", "SAME-SIZE", "BUILD")):
                summary["bad"].append({"family": family, "plan": plan, "outcome": outcome})
            elif outcome.startswith(("refused", "trace")):
                key = CAUSES.get(outcome) or normalize(outcome.removeprefix("refused: "))
                groups[key].append(f"{family}@{plan}")
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    summary["refusals"] = [{"reason": k, "count": len(v), "cases": v} for k, v in ranked]
    return summary


LIBRARY_TAGS = {"timm": "timm", "torchvision": "tv", "transformers": "hf"}


def _families_of(cases: list[str]) -> str:
    by_family: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        family, _, plan = case.partition("@")
        library, _, model = family.partition(".")
        by_family[f"{LIBRARY_TAGS.get(library, library)}.{model}"].append(plan)
    return ", ".join(f"{f}({'/'.join(p)})" if len(p) < 4 else f"{f}(all)"
                     for f, p in by_family.items())


def print_summary(summary: dict, top: int) -> None:
    print("\n| plan | families | lossless | share | aim | met | WRONG | guard | CRASH | "
          "TIMEOUT | trace | refused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for plan, s in summary["plans"].items():
        met = "yes" if s["share"] >= s["aim"] else "NO"
        print(f"| {plan} | {s['families']} | {s['lossless']} | {s['share']:.0%} | "
              f">= {s['aim']:.0%} | {met} | {s['WRONG']} | {s['WRONG-guard']} | "
              f"{s['CRASH']} | {s['TIMEOUT']} | {s['trace']} | {s['refused']} |")
    if summary["bad"]:
        print("\nWRONG / CRASH / TIMEOUT / SAME-SIZE / BUILD cases:")
        for case in summary["bad"]:
            print(f"  {case['family']} @ {case['plan']}: {case['outcome']}")
    print(f"\ntop refusal reasons ({len(summary['refusals'])} distinct):")
    for entry in summary["refusals"][:top]:
        print(f"  {entry['count']:3d}  {_short(entry['reason'], 240)}")
        print(f"       {_families_of(entry['cases'])}")


def _library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("torchvision", "timm", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "missing"
    return versions


def source_version() -> str:
    """The lemon_fx commit the sweep ran on, with ``+dirty`` for uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None,
                        help="substrings; a family runs when its name contains any")
    parser.add_argument("--plans", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--json", type=Path, default=None,
                        help="write {family: {plan: outcome}, '_summary': {...}} here")
    parser.add_argument("--case-timeout", type=int, default=180,
                        help="seconds one trace or one grow may take (default 180)")
    parser.add_argument("--top", type=int, default=20, help="refusal reasons to list")
    parser.add_argument("--build-only", action="store_true",
                        help="only build each family and run it in plain PyTorch")
    parser.add_argument("--warnings", action="store_true",
                        help="show warnings and library logging (hidden by default)")
    ns = parser.parse_args(argv)
    if not ns.warnings:
        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
        except ImportError:
            pass

    names = [n for n in FAMILIES
             if ns.families is None or any(s in n for s in ns.families)]
    if not names:
        print("no family matches", ns.families)
        return 2
    signal.signal(signal.SIGALRM, _on_alarm)
    results: dict[str, dict[str, str]] = {}
    version = source_version()
    start = time.perf_counter()
    width = max(len(n) for n in names)
    for name in names:
        t0 = time.perf_counter()
        if ns.build_only:
            torch.manual_seed(0)
            try:
                model = trained(FAMILIES[name].build())
                args = FAMILIES[name].inputs(torch.Generator().manual_seed(0))
                with torch.no_grad():
                    out = first_tensor(model(*args, **FAMILIES[name].kwargs))
                line = f"{_count(model):,} params -> {tuple(out.shape)}"
            except Exception as err:  # noqa: BLE001
                line = f"BUILD FAILED: {type(err).__name__}: {_short(err, 200)}"
            print(f"{name:<{width}}  {time.perf_counter() - t0:6.1f}s  {line}", flush=True)
            continue
        outcomes, note = run_family(name, ns.plans, ns.case_timeout)
        results[name] = outcomes
        codes = "  ".join(f"{p}={short_code(o)}" for p, o in outcomes.items())
        print(f"{name:<{width}}  {time.perf_counter() - t0:6.1f}s  {codes}   ({note})",
              flush=True)
        for plan, outcome in outcomes.items():
            if outcome.startswith(("WRONG", "CRASH", "TIMEOUT", "BUILD", "SAME-SIZE")):
                print(f"    {plan}: {outcome}", flush=True)
        gc.collect()
    if ns.build_only:
        return 0
    summary = summarize(results, ns.plans)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    summary["lemon_fx"] = version
    summary["versions"] = _library_versions()
    print_summary(summary, ns.top)
    print(f"\n{len(results)} families, {summary['elapsed_s']}s, lemon_fx {version}, "
          + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    if ns.json is not None:
        ns.json.write_text(json.dumps({**results, "_summary": summary}, indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
