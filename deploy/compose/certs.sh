#!/bin/sh
# The compose stack's certificates (the `certs` one-shot service; every server waits for it).
#
# Makes a development CA and one certificate per service and client with `rlhf certs`, once, into
# the `ca` volume: the only place the CA key and the other keys live, mounted by this service
# alone. Then copies into each service's own volume (mounted read-only at /certs there) its
# certificate and key and the CA certificate: tls.crt, tls.key, ca.crt, owned by the services'
# user 10001, the key readable by it alone. A container so holds its own key and nobody else's.
#
#   docker compose run --rm -e ROTATE=1 certs     new keys and certificates from the same CA;
#                                                 then `docker compose restart` the services
# A new CA: `docker compose down`, `docker volume rm <project>_ca`, `docker compose up`.
# CA_DIR, OUT_DIR and OWNER are for tests/test_compose_config.py, which runs it outside docker.
set -eu
SERVICES=policy,reward,reward-b,trainer
CLIENTS=admin
CA=${CA_DIR:-/ca}
OUT=${OUT_DIR:-/out}
OWNER=${OWNER:-10001:10001}

if [ ! -f "$CA/ca.pem" ]; then
  rlhf certs --out "$CA" --services "$SERVICES" --clients "$CLIENTS"
elif [ "${ROTATE:-0}" = 1 ]; then
  rlhf certs --out "$CA" --services "$SERVICES" --clients "$CLIENTS" --force
fi

# put SOURCE DEST MODE: a fresh copy (never written through: DEST may be a reader's 0400 file),
# its mode set while root owns it, then handed to user 10001 (this service has CAP_CHOWN only).
put() {
  rm -f "$2"
  cp "$1" "$2"
  chmod "$3" "$2"
  chown "$OWNER" "$2"
}

# issue FOLDER NAME: NAME's certificate and key, and the CA, into $OUT/FOLDER.
issue() {
  mkdir -p "$OUT/$1"
  put "$CA/ca.pem" "$OUT/$1/ca.crt" 0444
  put "$CA/$2.pem" "$OUT/$1/tls.crt" 0444
  put "$CA/$2.key" "$OUT/$1/tls.key" 0400
  echo "certs: $2 -> volume folder $1"
}

issue policy policy
issue reward reward
issue reward-b reward-b
issue trainer trainer
# `docker compose exec trainer rlhf swap-reward --tls-cert /certs/admin/tls.crt ...`: the trainer
# container holds the admin key, which grants only what it already has (its own control API).
issue trainer/admin admin
issue admin admin
