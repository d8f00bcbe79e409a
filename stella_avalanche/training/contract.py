"""The host contract: what the plugins of this package need from their strategy and its model.

A plugin of this package (``STELLAPlugin``, the replay baselines) runs inside an Avalanche strategy
and reaches into it: it reads the mini-batch dict, writes kept-patch ids or replay rows into it,
adds loss terms and registers optimizers. That is only correct when the strategy's ``forward``
passes those keys on to the model. :class:`PretrainingHost` and :class:`PretrainingModel` write the
contract down; :func:`check_host` checks it once, when training starts, and raises
:class:`HostContractError` naming what is missing. ``AudioVideoPretraining`` satisfies it.

The one thing a duck-typed check cannot see is whether ``forward`` really uses the keys a plugin
writes. So a host *declares* it: the class that defines ``forward`` also defines
``model_input_keys``, the batch keys that ``forward`` passes to the model. A subclass that overrides
``forward`` without declaring its own ``model_input_keys`` is treated as passing nothing, so
attaching ``STELLAPlugin`` to it is an error and not a run that silently selects nothing.

:func:`check_stock_plugins` covers Avalanche's own plugins on ``AudioVideoPretraining``:
:data:`STOCK_PLUGIN_SUPPORT` says which work and why the others are refused (the table in
docs/avalanche.md §14 is this dict).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

__all__ = ["PretrainingHost", "PretrainingModel", "HostRequirements", "HostContractError", "check_host",
           "check_stock_plugins", "check_strategy", "forward_owner", "declared_model_inputs",
           "unwrap_backbone", "STOCK_PLUGIN_SUPPORT"]


class HostContractError(TypeError):
    """A plugin is attached to a strategy (or model) that lacks what the plugin needs."""


@runtime_checkable
class PretrainingModel(Protocol):
    """What plugins call on the (unwrapped) backbone; ``CAVMAE`` implements it (``docs/contracts.md``).

    Shapes: ``video`` (B, T, 3, S, S), ``audio`` (B, 1, A, F), patches (B, K, P), token codes
    (B, K, D), pooled embeddings (B, D).
    """

    config: Any  #: sizes: ``num_frames``, ``img_size``, ``patch_size``, token counts, ``embed_dim``, ...

    def pretrain_forward(self, video: Any = None, audio: Any = None, **kw: Any) -> dict: ...
    def embed(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def patchify_video(self, video: torch.Tensor) -> torch.Tensor: ...
    def patchify_audio(self, audio: torch.Tensor) -> torch.Tensor: ...
    def encode_modality(self, patches: torch.Tensor, ids: Optional[torch.Tensor], modality: str) -> torch.Tensor: ...
    def fuse_joint(self, U_a: torch.Tensor, a_ids: Any, U_v: torch.Tensor, v_ids: Any) -> tuple: ...
    def fuse_unimodal(self, U: torch.Tensor, ids: Any, modality: str, **kw: Any) -> torch.Tensor: ...
    def pool(self, latent: torch.Tensor, modality: str, **kw: Any) -> torch.Tensor: ...


@runtime_checkable
class PretrainingHost(Protocol):
    """What plugins use on the strategy, checked when training starts.

    Per training step the host also provides (plugins check these when they read them): ``mbatch``,
    a dict of per-row tensors (``stella_avalanche.batch_keys``) that plugins may extend and add keys
    to; ``mb_output``, the model's output dict (``loss``, ``z_audio``, ``z_video`` (R, D) rows in
    ``mbatch`` order); ``loss``, to which plugins add their terms in ``before_backward``;
    ``is_training``.
    """

    #: batch keys ``forward`` passes to ``model.pretrain_forward`` (declared by the class defining ``forward``)
    model_input_keys: tuple[str, ...]
    #: optimizers stepped (and zeroed) together with the main one, through the same scaler
    extra_optimizers: list
    #: autocast dtype of the training forward, None for fp32
    amp_dtype: Optional[torch.dtype]
    device: torch.device

    @property
    def backbone(self) -> nn.Module:
        """The model without a DDP wrapper."""
        ...


@dataclass(frozen=True)
class HostRequirements:
    """What one plugin needs (a plugin class exposes it as ``host_requirements``).

    :param host: members of :class:`PretrainingHost` the plugin uses.
    :param model_inputs: batch keys the plugin writes and the model must receive.
    :param model: members of :class:`PretrainingModel` the plugin calls.
    """

    host: tuple[str, ...] = ("backbone", "device")
    model_inputs: tuple[str, ...] = ("video", "audio")
    model: tuple[str, ...] = ("pretrain_forward",)


#: members of :class:`PretrainingModel` that are data, not methods
_MODEL_ATTRIBUTES = ("config",)


def forward_owner(strategy: Any) -> type:
    """The class in the strategy's MRO that defines the ``forward`` it runs."""
    for cls in type(strategy).__mro__:
        if "forward" in vars(cls):
            return cls
    return type(strategy)


def declared_model_inputs(strategy: Any) -> tuple[str, ...]:
    """The batch keys the strategy's ``forward`` declares it passes to the model (empty when the
    class defining ``forward`` declares nothing: a stock template or an override)."""
    return tuple(vars(forward_owner(strategy)).get("model_input_keys", ()))


def unwrap_backbone(strategy: Any) -> Any:
    """The strategy's model without a DDP wrapper: ``strategy.backbone``, else ``strategy.model`` or
    its ``.module``; None when the strategy has neither (:func:`check_host` reports that). The replay
    plugins use it through ``training/plugins/replay_base.py``."""
    model = getattr(strategy, "backbone", None)
    if model is None:
        model = getattr(strategy, "model", None)
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def check_host(strategy: Any, plugin: Any, requirements: Optional[HostRequirements] = None) -> None:
    """Check that ``strategy`` (and its model) provide what ``plugin`` needs.

    :param requirements: defaults to ``plugin.host_requirements``.
    :raises HostContractError: naming the plugin, the strategy class and every missing piece.
    """
    req = requirements or getattr(plugin, "host_requirements", None) or HostRequirements()
    name, host = type(plugin).__name__, type(strategy).__name__
    problems: list[str] = []
    missing = [m for m in req.host if not hasattr(strategy, m)]
    if missing:
        problems.append(f"it lacks strategy attribute(s) {missing} (see PretrainingHost)")
    passed = declared_model_inputs(strategy)
    ignored = [k for k in req.model_inputs if k not in passed]
    if ignored:
        owner = forward_owner(strategy)
        problems.append(
            f"{owner.__qualname__}.forward does not pass {ignored} to the model (it declares "
            f"model_input_keys={list(passed)}): the {name} rows/ids written into the mini-batch would be "
            "ignored. Use AudioVideoPretraining, or declare `model_input_keys` next to your forward "
            "and pass those keys to model.pretrain_forward")
    model = unwrap_backbone(strategy)
    if model is None:
        problems.append("it has no model (strategy.model)")
    else:
        lacking = [m for m in req.model if not hasattr(model, m)
                   or (m not in _MODEL_ATTRIBUTES and not callable(getattr(model, m)))]
        if lacking:
            problems.append(f"it lacks model method(s) {lacking} on {type(model).__name__} (see PretrainingModel)")
    if problems:
        raise HostContractError(f"{name} cannot run on {host}: " + "; ".join(problems) + ".")


#: Avalanche plugins on ``AudioVideoPretraining``: class name -> (works, why)
STOCK_PLUGIN_SUPPORT: dict[str, tuple[bool, str]] = {
    "ReplayPlugin": (True, "replays stored clips through Avalanche's ReplayDataLoader (dict samples are "
                           "concatenated by the dataset's collate). Its loader replaces the seeded "
                           "epoch sampler, so a run resumed in the middle of an experience does not "
                           "see the same batches"),
    "LRSchedulerPlugin": (True, "steps the scheduler of the strategy's optimizer per epoch or iteration"),
    "SynapticIntelligencePlugin": (False, "on CPU its parameter snapshots are views of the parameters "
                                          "themselves (`param.detach().cpu().flatten()` copies nothing "
                                          "there), so the optimizer moves them too, every importance "
                                          "stays 0 and the penalty is a silent no-op. Allowed on CUDA, "
                                          "where the snapshots are copies (not exercised by the CPU tests)"),
    "EarlyStoppingPlugin": (True, "it watches a metric of periodic evaluation, so it needs a retrieval "
                                  "metric as metric_name (e.g. 'A2V_R@1_Exp' or 'V2A_R@5_Pooled', mode "
                                  "'max'), eval_every > 0 and its val_stream_name among the eval_streams "
                                  "given to train(). Refused otherwise: with its default 'Top1_Acc_Stream' "
                                  "(no accuracy is ever reported here) it would never stop training"),
    "EWCPlugin": (False, "it computes Fisher importances from (x, y, task) tuple batches with a "
                         "classification criterion; this template has dict batches and a "
                         "self-supervised loss (it fails after the first experience)"),
    "LwFPlugin": (False, "it distils the previous model's class logits and reads the task labels of "
                         "classification datasets; the pre-training forward returns losses and "
                         "embeddings, no logits"),
    "GEMPlugin": (False, "it stores (x, y, task) tuple patterns and projects the gradients of a "
                         "classification loss on them; dict batches and a self-supervised loss have neither"),
}


#: the names of the retrieval metrics of ``stella_avalanche.evaluation.metrics`` (what a plugin can watch)
_RETRIEVAL_METRIC = re.compile(r"^(A2V|V2A)_(R@\d+|MR|MRpess)_\w+$")


def _early_stopping_usable(strategy: Any, plugin: Any) -> bool:
    """A retrieval metric, periodic evaluation, and the watched stream among the evaluated ones."""
    streams = {f"{group[0].origin_stream.name}_stream" for group in (getattr(strategy, "_eval_streams", None) or [])
               if group and hasattr(group[0], "origin_stream")}
    return (bool(_RETRIEVAL_METRIC.match(str(getattr(plugin, "metric_name", ""))))
            and getattr(strategy, "eval_every", -1) > 0 and getattr(plugin, "val_stream_name", None) in streams)


def _on_cuda(strategy: Any, plugin: Any) -> bool:
    return torch.device(getattr(strategy, "device", "cpu")).type == "cuda"


#: refused plugins that are allowed under a condition: class name -> condition(strategy, plugin)
_ALLOWED_IF = {"SynapticIntelligencePlugin": _on_cuda}
#: working plugins that are refused unless a condition holds: class name -> condition(strategy, plugin)
_ONLY_IF = {"EarlyStoppingPlugin": _early_stopping_usable}


def check_stock_plugins(strategy: Any) -> None:
    """Refuse Avalanche plugins that cannot work on this template (see :data:`STOCK_PLUGIN_SUPPORT`).

    :raises HostContractError: naming the plugin and why.
    """
    for p in getattr(strategy, "plugins", []):
        for cls in type(p).__mro__:
            if not cls.__module__.startswith("avalanche.") or cls.__name__ not in STOCK_PLUGIN_SUPPORT:
                continue
            works, why = STOCK_PLUGIN_SUPPORT[cls.__name__]
            allowed_if, only_if = _ALLOWED_IF.get(cls.__name__), _ONLY_IF.get(cls.__name__)
            refused = (not works and not (allowed_if is not None and allowed_if(strategy, p))) or \
                (works and only_if is not None and not only_if(strategy, p))
            if refused:
                verdict = "cannot run as configured on" if works else "is not supported on"
                raise HostContractError(f"{type(p).__name__} {verdict} {type(strategy).__name__}: {why}.")
            break


def check_strategy(strategy: Any, plugins: Optional[Sequence[Any]] = None) -> None:
    """Everything checked when training starts: the stock plugins, then every plugin that states
    its :class:`HostRequirements` (``host_requirements``)."""
    check_stock_plugins(strategy)
    for p in plugins if plugins is not None else getattr(strategy, "plugins", []):
        if getattr(p, "host_requirements", None) is not None:
            check_host(strategy, p)
