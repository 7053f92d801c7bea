"""The architecture registry: `sae.architecture=NAME` builds the class registered as NAME.

An architecture is one module in this package (every module here is imported with it) and
one file, conf/architecture/NAME.yaml, that extends the config schema registered here:

    @register_architecture("myarch")
    class MySAE(SAE):
        config_class = MySAEConfig      # a dataclass whose `architecture` default is "myarch"
        rank_combine = {**SAE.rank_combine, "my_counter": "min"}   # its running buffers
        export_architecture = "jumprelu"                            # how SAELens loads it

The class itself declares what data-parallel ranks must combine (`rank_combine`, applied by
saesweep.training.distributed) and how it exports for inference (`export_architecture`,
`export_transcoder_architecture`, `export_tensors`, `export_config`, applied by
saesweep.sae_format.write); neither module names an architecture.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from hydra.core.config_store import ConfigStore

from saesweep.sae.base import RANK_RULES, SAE

ARCHITECTURES: dict[str, type[SAE]] = {}

# conf/architecture/NAME.yaml starts from this config group's NAME: `- /schema/sae/NAME@_here_`.
SAE_SCHEMA_GROUP = "schema/sae"

S = TypeVar("S", bound=type[SAE])


def register_architecture(name: str) -> Callable[[S], S]:
    """Class decorator: register an SAE class as architecture `name`, and its config class
    as the Hydra schema of the `sae` node for that architecture."""

    def register(cls: S) -> S:
        declared = cls.config_class().architecture
        if declared != name:
            raise TypeError(
                f"{cls.__name__}: its config class {cls.config_class.__name__} says architecture "
                f"{declared!r}; give it `architecture: str = {name!r}`"
            )
        if ARCHITECTURES.get(name, cls) is not cls:
            raise TypeError(f"architecture {name!r} is registered already, by {ARCHITECTURES[name].__name__}")
        unknown = set(cls.rank_combine.values()) - set(RANK_RULES)
        if unknown:
            raise TypeError(f"{cls.__name__}.rank_combine: no rule {sorted(unknown)}; valid: {', '.join(RANK_RULES)}")
        ARCHITECTURES[name] = cls
        ConfigStore.instance().store(group=SAE_SCHEMA_GROUP, name=name, node=cls.config_class)
        return cls

    return register
