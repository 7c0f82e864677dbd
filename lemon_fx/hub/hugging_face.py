"""``grow_pretrained`` for Hugging Face: a model folder in, a folder ``from_pretrained`` reads
out, checked by reloading it with the library's own loader.

The grown sizes in ``config.json`` come from what the analysis resolved, not from names:
the residual group's size is ``hidden_size``, the FFN group's ``intermediate_size``, the
heads' ``num_attention_heads`` (key/value heads ``num_key_value_heads``), ``head_dim``
stays, and the block stack's grown length is ``num_hidden_layers`` (per-layer lists such as
``layer_types`` follow the block order). Spellings such as GPT-2's ``n_embd``/``n_layer``
go through the config's own ``attribute_map``. A plan the config cannot express (two
blocks grown to different widths, a width the config does not name, an embedding scaled by
``sqrt(hidden_size)``, a non-multiple width whose norms' scaled eps the config cannot
hold) is refused before anything is written. At a non-multiple width the norms' eps is
scaled as the graph's is (``rms_norm_eps``, ``layer_norm_eps``...). A group as wide as the
residual stream outside the blocks (a pooler) is sized by ``hidden_size``; fields that
default to it (``word_embed_proj_dim``) follow it.

Weights are made one tensor at a time by the recipe from the loaded source (the check
loads it anyway) and written as sharded safetensors with their index (no second full copy
in memory); ``generation_config.json`` and every
tokenizer file are carried over; a README model card states the plan and the check. The
folder is written beside ``out_dir`` and renamed at the end: a failed check leaves none.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lemon_fx.api import plan_in_detail, trace, warn_what_a_bare_plan_left
from lemon_fx.axes.vocabulary import FFN, HEAD_DIM, HEADS, KV_HEADS, RESIDUAL
from lemon_fx.errors import PlanError, Problem, VerificationError
from lemon_fx.hub.folder import (
    PretrainedGrowth,
    check_reloaded,
    model_card,
    norm_eps_scale,
    staged_folder,
)
from lemon_fx.plan import Plan
from lemon_fx.recipe.safetensors_io import write_sharded

__all__ = ["PretrainedGrowth", "example_inputs_for", "grow_hugging_face", "model_class"]

# files of a model folder that the grown folder writes itself
_OWN_FILES = {"config.json", "model.safetensors.index.json", "README.md",
              "pytorch_model.bin", "pytorch_model.bin.index.json"}
# role -> the config's standard attribute (attribute_map gives each model's spelling)
_ROLE_ATTRIBUTES = {RESIDUAL: "hidden_size", FFN: "intermediate_size",
                    HEADS: "num_attention_heads", KV_HEADS: "num_key_value_heads",
                    HEAD_DIM: "head_dim"}
_FFN_SPELLINGS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
# the config fields a model's norms read their eps from
_EPS_SPELLINGS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
# config fields that name a width equal to hidden_size unless set otherwise (an embedding,
# a pooler)
_FOLLOW_HIDDEN = ("word_embed_proj_dim", "embedding_size", "pooler_output_size")


def _transformers():
    import transformers

    return transformers


def model_class(config: Any) -> type:
    """The transformers class ``config.architectures`` names; PlanError if none exists."""
    names = list(getattr(config, "architectures", None) or [])
    transformers = _transformers()
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise PlanError("the model folder names no class transformers has", [Problem(
        reason=f"config.architectures is {names!r}", node="config.json",
        fix="save the model with save_pretrained, which records its class")])


def example_inputs_for(model: Any, config: Any, *, batch: int = 1, length: int = 8,
                       seed: int = 0) -> tuple[tuple, dict]:
    """Inputs a model of this config takes: pixel values or ``length`` token ids, as
    positional arguments and keywords (``use_cache=False`` where forward names it)."""
    generator = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return (torch.randn(batch, channels, size, size, generator=generator),), {}
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    return (ids,), _no_cache(model)


def _no_cache(model: Any) -> dict:
    """``use_cache=False`` where forward names it (a cache in the outputs cannot be traced;
    one that only reaches ``**kwargs`` is left out)."""
    import inspect

    return ({"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters
            else {})


def _grown_config(config: Any, planned: Any) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """A copy of ``config`` with every grown size the resolution found."""
    grown = config.__class__.from_dict(config.to_dict())
    changes: dict[str, tuple[Any, Any]] = {}
    problems: list[Problem] = []
    pairs = [(g, (g.size, planned.resolution.target(g.leaf))) for g in planned.analysis.groups]
    residual = {pair for g, pair in pairs if g.role == RESIDUAL}
    by_role: dict[str, set[int]] = {}
    embedding = getattr(config, "embedding_size", None)
    for group, pair in pairs:
        others = {q for g, q in pairs if g.role == group.role and q != pair}
        moe_field = _moe_ffn_field(config, group) if group.role == FFN else None
        if moe_field is not None:  # an expert's or the shared expert's FFN: its own field
            by_role.setdefault(moe_field, set()).add(pair[1])
            continue
        if (group.role == RESIDUAL and embedding is not None and group.size == embedding
                != getattr(config, "hidden_size", None)):
            # ALBERT's factorized embeddings: a stream of their own, embedding_size wide
            if pair[1] != pair[0]:
                grown.embedding_size = pair[1]
                changes["embedding_size"] = pair
            continue
        if group.role != RESIDUAL and pair in residual and others:
            # hidden_size wide (BERT's and ViT's pooler after its FFNs): the config's
            # hidden_size says its size
            continue
        by_role.setdefault(group.role, set()).add(pair[1])
    for role, targets in by_role.items():
        moe = role in _MOE_FIELDS  # by_role holds MoE fields beside roles
        sizes = {g.size for g, _ in pairs
                 if (_moe_ffn_field(config, g) == role if moe else g.role == role)}
        if len(targets) > 1:
            problems.append(Problem(
                reason=f"the {role} groups grow to different sizes {sorted(targets)}, and "
                "the config has one size for all layers", node=role,
                fix=f"grow every {role} group to one size"))
            continue
        (target,) = targets
        if sizes == {target}:
            continue
        attribute = role if moe else _ROLE_ATTRIBUTES.get(role)  # an MoE field names itself
        if role == FFN:
            attribute = next((a for a in _FFN_SPELLINGS if getattr(config, a, None)
                              is not None), None)
            derived = next((a for a in _FFN_SPELLINGS if hasattr(config, a)
                            and getattr(config, a) is None), None)
            if attribute is None and derived is not None:
                # None means 4 x the hidden size (GPT-2's n_inner, GPT-Neo's
                # intermediate_size): said explicitly unless the grown FFN is that again
                hidden = by_role.get(RESIDUAL, set())
                if hidden == {target // 4} and target % 4 == 0:
                    continue
                attribute = derived
        if attribute is None or not hasattr(config, attribute):
            problems.append(Problem(
                reason=f"the {role} width grows ({sorted(sizes)} -> {target}), and "
                f"{type(config).__name__} has no field for it", node=role,
                fix=f"keep the {role} width fixed in the plan"))
            continue
        old = getattr(config, attribute)
        setattr(grown, attribute, target)
        changes[attribute] = (old, target)
    hidden = changes.get("hidden_size")
    if hidden is not None:
        for attribute in _FOLLOW_HIDDEN:
            # an embedding width that defaults to hidden_size (OPT's word_embed_proj_dim):
            # left alone it would add projections the grown weights do not have
            if getattr(config, attribute, None) == hidden[0]:
                setattr(grown, attribute, hidden[1])
                changes[attribute] = hidden
        if _scales_embeddings(planned.source):
            problems.append(Problem(
                reason="the model multiplies its embeddings by sqrt(hidden_size) (Gemma's "
                "embed_scale), which the grown config would change", node="embed_scale",
                fix="keep the residual width (grow @ffn, @heads or depth), or grow with "
                "lemon_fx.grow and keep the GraphModule"))
    scale = norm_eps_scale(planned)
    eps_fields = [a for a in _EPS_SPELLINGS if isinstance(getattr(config, a, None), float)]
    if scale is None or (scale != 1.0 and not eps_fields):
        problems.append(Problem(
            reason="the grown norms need their eps scaled (a normalized width grows by a "
            f"non-multiple), and {type(config).__name__} has "
            + ("no eps field" if scale else "one eps for norms that need different ones"),
            node="eps", fix="grow the normalized widths by a whole multiple (2x, 3x)"))
    elif scale != 1.0:
        for attribute in eps_fields:
            old = getattr(config, attribute)
            setattr(grown, attribute, old * scale)
            changes[attribute] = (old, old * scale)
    heads = changes.get("num_attention_heads")
    if (heads is not None and KV_HEADS not in by_role
            and getattr(config, "num_key_value_heads", None) == heads[0]):
        # multi-head attention spelled with num_key_value_heads = num_attention_heads (Phi,
        # GPT-NeoX-style configs that default it): the key/value heads are the heads
        grown.num_key_value_heads = heads[1]
        changes["num_key_value_heads"] = (heads[0], heads[1])
    kv = changes.get("num_key_value_heads")
    if kv is not None and HEADS not in by_role and getattr(config, "num_attention_heads", None):
        # grouped-query attention: each key/value head serves a fixed number of query heads
        per_kv = config.num_attention_heads // kv[0]
        grown.num_attention_heads = per_kv * kv[1]
        changes["num_attention_heads"] = (config.num_attention_heads, per_kv * kv[1])
    for growth in planned.growths:
        old = getattr(config, "num_hidden_layers", None)
        if old != growth.stack.count:
            problems.append(Problem(
                reason=f"stack {growth.stack.name!r} has {growth.stack.count} blocks and "
                f"the config {old} layers", node=growth.stack.name,
                fix="grow the model's main block stack only"))
            continue
        grown.num_hidden_layers = len(growth.order)
        changes["num_hidden_layers"] = (old, len(growth.order))
        for name, value in config.to_dict().items():
            if isinstance(value, list) and len(value) == old and name != "architectures":
                setattr(grown, name, [value[i] for i in growth.order])
                changes[name] = (value, getattr(grown, name))
    if problems:
        raise PlanError("the config cannot express this plan", problems)
    return grown, changes


# an FFN inside a mixture of experts, by the path of its weights -> the config's field
# (Qwen2-MoE, Qwen3-MoE, OLMoE: moe_intermediate_size; Mixtral's experts use
# intermediate_size, which the plain FFN spelling finds)
_MOE_FFN_FIELDS = ((".shared_expert.", "shared_expert_intermediate_size"),
                   (".experts.", "moe_intermediate_size"))
_MOE_FIELDS = {field for _, field in _MOE_FFN_FIELDS}


def _moe_ffn_field(config: Any, group: Any) -> str | None:
    """The config field that sizes this FFN group when its weights all belong to the
    experts or to the shared expert of a mixture of experts and the config has that
    field; else None (the plain FFN field)."""
    paths = [member.split("[")[0] for member in group.members]
    for part, field in _MOE_FFN_FIELDS:
        if paths and all(part in path for path in paths) and \
                isinstance(getattr(config, field, None), int):
            return field
    return None


def _scales_embeddings(gm: torch.fx.GraphModule) -> bool:
    """Whether an embedding is scaled by a number computed from the config at build time
    (Gemma's non-persistent ``embed_scale``): the traced graph keeps the source's value,
    a model built from the grown config computes another."""
    return any(name.endswith("embed_scale") for name, _ in gm.named_buffers()) or any(
        n.op == "get_attr" and str(n.target).endswith("embed_scale") for n in gm.graph.nodes)


def _outputs(model: Any, inputs: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*inputs, **kwargs)


def _check(source: Any, reloaded: Any, config: Any) -> tuple[float, bool | None]:
    """The reloaded folder against the source on fresh inputs (float32), and greedy
    generation with the KV cache for causal LMs."""
    inputs, kwargs = example_inputs_for(source, config, batch=2, length=12, seed=1)
    want, got = _outputs(source, inputs, kwargs), _outputs(reloaded, inputs, kwargs)
    error = check_reloaded(want, got, "from_pretrained")
    can_generate = getattr(source, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return error, None
    with torch.no_grad():
        ids = inputs[0][:1, :6]
        a = source.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        b = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    if not torch.equal(a, b):
        raise VerificationError("greedy generate() of the grown folder differs", [Problem(
            reason=f"source tokens {a.tolist()}, grown {b.tolist()}",
            fix="report this as a bug with the model and the plan")])
    return error, True


def grow_hugging_face(source: Any, plan: Any, out_dir: str | Path,
                      example_inputs: Any = None) -> PretrainedGrowth:
    """Grow a Hugging Face model folder (or a ``PreTrainedModel``) into ``out_dir``."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    out = Path(out_dir)
    transformers = _transformers()
    folder = None
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "config.json").exists():
            raise PlanError(f"{folder} is no Hugging Face model folder", [Problem(
                reason="it has no config.json", node="source",
                fix="pass a folder written by save_pretrained")])
        config = transformers.AutoConfig.from_pretrained(folder)
        cls = model_class(config)
        with torch.device("meta"):
            weightless = cls(config)
        model_for_plan = weightless
        name = str(folder)
    else:
        config, cls = source.config, type(source)
        model_for_plan = source
        name = getattr(config, "_name_or_path", "") or cls.__name__
    model_for_plan.eval()
    if example_inputs is None:
        args, kwargs = example_inputs_for(model_for_plan, config)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple)
                        else (example_inputs,)), {}
    gm = trace(model_for_plan, args, kwargs)
    planned = plan_in_detail(gm, plan)
    warn_what_a_bare_plan_left(planned, plan, stacklevel=3)
    grown_config, changes = _grown_config(config, planned)
    recipe = planned.recipe
    with staged_folder(out) as staging:
        # the check needs the source model loaded, and its state_dict has the class' own
        # names: transformers renames checkpoint keys as it loads them (GPT-NeoX's
        # embed_out -> lm_head, ViT's attention.query -> q_proj), so the files' do not
        source_model = cls.from_pretrained(folder).eval() if folder is not None else source
        state = source_model.state_dict()

        def tensor(key: str) -> torch.Tensor:
            return state[key]

        grown_config.architectures = [cls.__name__]
        grown_config.save_pretrained(staging)
        made = ((n, recipe.make(n, tensor(r.source), read=tensor))
                for n, r in recipe.tensors.items())
        write_sharded(made, recipe.shapes, recipe.aliases, staging, "5GB", progress=False)
        if folder is not None:
            for file in folder.iterdir():  # tokenizer, generation config, ...
                if file.is_file() and file.name not in _OWN_FILES and \
                        file.suffix != ".safetensors":
                    shutil.copy2(file, staging / file.name)
        elif getattr(source, "generation_config", None) is not None:
            source.generation_config.save_pretrained(staging)
        reloaded = transformers.AutoConfig.from_pretrained(staging)
        reloaded_model = model_class(reloaded).from_pretrained(staging).eval()
        error, generate_equal = _check(source_model, reloaded_model, config)
        growth = PretrainedGrowth(out, plan, changes, error, generate_equal)
        (staging / "README.md").write_text(model_card(name, plan, growth))
    return growth
