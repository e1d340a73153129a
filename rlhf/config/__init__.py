"""One typed config system for every process: dataclasses with a docstring under each field.

- `fields`: field docstrings (read from source, as CleanRL/tyro do) and value conversion.
- `sections`: a config of sections: YAML text, `section.field=value` overrides, validation.
- `flags`: argparse flags `--field-name` with RLHF_FIELD_NAME defaults, generated from a class.
- `server`: ServerConfig, the listening settings every service shares.
- `security`: TlsConfig and AuthConfig (inside ServerConfig), ClientConfig (clients' TLS and
  bearer token).

Torch- and grpc-free: `rlhf --help` and config parsing import it.
"""

from __future__ import annotations

from rlhf.config.fields import coerce_value, field_docs
from rlhf.config.flags import add_dataclass_arguments, add_env_argument, env_name, from_args
from rlhf.config.sections import apply_mapping, apply_overrides, check, load_yaml_mapping
from rlhf.config.server import (
    ServerConfig,
    add_server_arguments,
    server_config,
    service_settings,
)
from rlhf.defaults import ENV_PREFIX

__all__ = [
    "ENV_PREFIX",
    "ServerConfig",
    "add_dataclass_arguments",
    "add_env_argument",
    "add_server_arguments",
    "apply_mapping",
    "apply_overrides",
    "check",
    "coerce_value",
    "env_name",
    "field_docs",
    "from_args",
    "load_yaml_mapping",
    "server_config",
    "service_settings",
]
