"""A new classifier head: the same model for another number of classes (docs/design.md 5).

As timm does for ``create_model(name, pretrained=True, num_classes=N)``: the architecture is
built again with ``num_classes=N`` (so the new head gets the architecture's own initialisation),
every weight but the classifier's is copied over, and the classifier starts fresh. For a
converted model the same convs are converted again (`passes.convert.rebuild`), so binary
filters, M-Filters and latent filters are kept exactly; the stored model description
(`ModelSource`) gets the new ``num_classes``, so checkpoints of the result load as usual.
"""

from __future__ import annotations

from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.models import rebuild_model
from mcn_compress.nn.mcconv import MCConv2d


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A copy of ``model`` whose classifier predicts ``num_classes`` classes, freshly
    initialised; ``model`` is left as it is.

    Raises `ConfigError` when ``model`` does not record its architecture (`ModelSource`), or
    when other weights than the classifier's would change shape.
    """
    from mcn_compress.passes.convert import rebuild

    info = info_of(model)
    source = info.source
    if source is None:
        raise ConfigError(
            f"cannot give {type(model).__name__} a new classifier: it does not record its "
            "architecture (build it with load_float_model, or load a checkpoint)"
        )
    kwargs = {**source.kwargs, "num_classes": num_classes}
    # the published or file weights no longer describe this model: weights=None
    new_source = ModelSource(source.library, source.name, kwargs, None)
    new = rebuild_model(new_source)
    if info.config is not None:
        layers = [name for name, m in model.named_modules() if isinstance(m, MCConv2d)]
        new = rebuild(new, info.config, layers)
    old_state, new_state = model.state_dict(), new.state_dict()
    changed = {
        _module_of(k)
        for k in set(old_state) | set(new_state)
        if k not in old_state or k not in new_state or old_state[k].shape != new_state[k].shape
    }
    modules = dict(new.named_modules())
    heads = {
        name
        for name in changed
        if isinstance(modules.get(name), nn.Linear | nn.Conv2d)
        and getattr(modules[name], "out_features", getattr(modules[name], "out_channels", 0))
        == num_classes
    }
    if changed - heads:
        raise ConfigError(
            f"cannot give {source.display_name} a {num_classes}-class classifier: other layers "
            f"change too ({', '.join(sorted(changed - heads)[:3])})"
        )
    new.load_state_dict(
        {k: v for k, v in old_state.items() if _module_of(k) not in heads}, strict=False
    )
    update_info(new, source=new_source, config=info.config, metadata=dict(info.metadata))
    return new.train(model.training)
