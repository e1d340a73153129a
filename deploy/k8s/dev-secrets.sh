#!/usr/bin/env bash
# Development certificates for the Kubernetes manifests: `rlhf certs` makes a CA and one
# certificate per service and for `admin` into CERTS_DIR (default ./certs; an existing CA and
# keys there are reused), then this prints the Secrets the pods mount, for `kubectl apply`:
#
#   deploy/k8s/dev-secrets.sh rlhf | kubectl apply -n rlhf -f -
#   ROTATE=1 deploy/k8s/dev-secrets.sh rlhf | kubectl apply -n rlhf -f -   # new keys, same CA
#
# NAMESPACE puts NAME.NAMESPACE.svc(.cluster.local) in the service certificates beside NAME,
# localhost and 127.0.0.1. The replicas of a Deployment share its Secret: the trainer reaches
# them as dns:///policy:50051 and dns:///reward:50052 and checks each against the name. Secrets: rlhf-tls-NAME (kubernetes.io/tls: tls.crt, tls.key) for
# policy, reward, reward-b, trainer and admin; rlhf-ca (ca.crt: the CA certificate, never its
# key, which stays in CERTS_DIR: keep that folder as you would any CA key). In production use
# cert-manager instead (deploy/k8s/cert-manager).
set -euo pipefail
NAMESPACE=${1:?usage: dev-secrets.sh NAMESPACE [CERTS_DIR]}
DIR=${2:-certs}
SERVICES=policy,reward,reward-b,trainer
CLIENTS=admin
KUBECTL=${KUBECTL:-kubectl}

if [[ ! -f $DIR/ca.pem || ${ROTATE:-0} == 1 ]]; then
  force=()
  [[ -f $DIR/ca.pem ]] && force=(--force)
  rlhf certs --out "$DIR" --services "$SERVICES" --clients "$CLIENTS" \
    --domains "$NAMESPACE.svc,$NAMESPACE.svc.cluster.local" "${force[@]}" >&2
fi

for name in ${SERVICES//,/ } ${CLIENTS//,/ }; do
  echo "---"
  "$KUBECTL" create secret tls "rlhf-tls-$name" --namespace "$NAMESPACE" \
    --cert "$DIR/$name.pem" --key "$DIR/$name.key" --dry-run=client -o yaml
done
echo "---"
"$KUBECTL" create secret generic rlhf-ca --namespace "$NAMESPACE" \
  --from-file=ca.crt="$DIR/ca.pem" --dry-run=client -o yaml
