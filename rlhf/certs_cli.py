"""`rlhf certs`: make a development CA and per-service and per-client certificates.

What it writes, and how to rotate certificates, is in `rlhf.certs`' docstring.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.config.security import LOCAL_HOSTS


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Make a development CA (or reuse the one in --out) and certificates for services "
        "(serving and client use) and clients, for --tls-cert/--tls-key/--tls-ca."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--out",
        required=True,
        default=argparse.SUPPRESS,
        help="folder to write ca.pem/ca.key and NAME.pem/NAME.key into",
    )
    parser.add_argument(
        "--services",
        type=_names,
        default="policy,reward,trainer",
        help="comma-separated service names; each gets a server certificate",
    )
    parser.add_argument(
        "--clients",
        type=_names,
        default="admin",
        help="comma-separated client identities; each gets a client certificate (CN=NAME)",
    )
    parser.add_argument(
        "--hosts",
        type=_names,
        default=",".join(LOCAL_HOSTS),
        help="comma-separated DNS names and IPs added to every service certificate "
        "(each service's own name is always in its own certificate; never list one here)",
    )
    parser.add_argument(
        "--domains",
        type=_names,
        default="",
        help="comma-separated DNS suffixes: each service also gets NAME.SUFFIX "
        "(e.g. rlhf.svc,rlhf.svc.cluster.local for Kubernetes Services)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of leaf certificates")
    parser.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA")
    parser.add_argument(
        "--force", action="store_true", help="replace existing NAME.key/NAME.pem (rotation)"
    )


def run(args: argparse.Namespace) -> int:
    from rlhf.certs import CertError, make_certs

    try:
        issued = make_certs(
            Path(args.out),
            services=args.services,
            clients=args.clients,
            hosts=args.hosts,
            domains=args.domains,
            days=args.days,
            ca_days=args.ca_days,
            force=args.force,
        )
    except (CertError, OSError) as err:
        print(f"rlhf certs: {err}", file=sys.stderr)
        return 1
    for item in issued:
        print(f"{item.role:6} {item.name}: {item.cert_path} (key {item.key_path})")
    if not any(item.role == "ca" for item in issued):
        print(f"CA: reused {Path(args.out) / 'ca.pem'}")
    return 0
