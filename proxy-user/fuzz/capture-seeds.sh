#!/usr/bin/env bash
# Re-captures the seed corpus: what real clients send as their CONNECT head, on loopback only.
# A recorder on 127.0.0.1 stores the bytes each client sends until the end of its head (no
# reply is given; the client then times out). Needs python3, curl, socat, openssl, stunnel4.
#   proxy-user/fuzz/capture-seeds.sh [OUT_DIR]    (default: proxy-user/fuzz/corpus/head)
set -euo pipefail
out=${1:-$(dirname "$0")/corpus/head}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/rec.py" <<'PY'
import socket, sys
out, port_file = sys.argv[1], sys.argv[2]
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
open(port_file, "w").write(str(l.getsockname()[1]))
l.settimeout(15)
c, _ = l.accept(); c.settimeout(3)
data = b""
try:
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        b = c.recv(65536)
        if not b: break
        data += b
except socket.timeout:
    pass
open(out, "wb").write(data)
print(out, len(data), "bytes")
PY

# capture NAME COMMAND...: COMMAND runs with $P set to the recorder's port.
capture() {
    local name=$1; shift
    rm -f "$work/port"
    python3 "$work/rec.py" "$out/$name" "$work/port" &
    local rec=$!
    while [ ! -s "$work/port" ]; do sleep 0.1; done
    P=$(cat "$work/port") eval "$*" >/dev/null 2>&1 </dev/null || true
    wait "$rec"
}

capture curl-auth 'timeout 5 curl -s -x http://127.0.0.1:$P --proxy-user "mig:s3cr:et" https://route.example:443/'
capture curl-noauth 'timeout 5 curl -s -x http://127.0.0.1:$P https://route.example:6443/'
capture curl-proxy10 'timeout 5 curl -s --proxy1.0 127.0.0.1:$P --proxy-user mig:pw https://route.example/'
capture curl-ipv6 'timeout 5 curl -s -g -x http://127.0.0.1:$P --proxy-user "mig:s3cr:et" "https://[2001:db8::1]:443/"'
capture curl-ipv4 'timeout 5 curl -s -x http://127.0.0.1:$P https://192.0.2.10:8443/'
capture socat-auth 'timeout 5 socat - PROXY:127.0.0.1:route.example:443,proxyport=$P,proxyauth=mig:s3cr:et'
capture socat-noauth 'timeout 5 socat - PROXY:127.0.0.1:192.0.2.10:443,proxyport=$P'
capture openssl-auth 'timeout 5 openssl s_client -proxy 127.0.0.1:$P -proxy_user mig -proxy_pass pass:s3cr:et -connect route.example:443'
capture openssl-noauth 'timeout 5 openssl s_client -proxy 127.0.0.1:$P -connect route.example:443'

# stunnel: a client service whose connect goes through the recorder; one connection triggers it.
stunnel_capture() {
    local name=$1 host=$2 creds=$3
    rm -f "$work/port"
    python3 "$work/rec.py" "$out/$name" "$work/port" &
    local rec=$!
    while [ ! -s "$work/port" ]; do sleep 0.1; done
    local accept
    accept=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    {
        echo "foreground = yes"
        echo "pid ="
        echo "[t]"
        echo "client = yes"
        echo "accept = 127.0.0.1:$accept"
        echo "connect = 127.0.0.1:$(cat "$work/port")"
        echo "protocol = connect"
        echo "protocolHost = $host"
        [ -n "$creds" ] && echo "protocolUsername = ${creds%%:*}" && echo "protocolPassword = ${creds#*:}"
    } >"$work/stunnel.conf"
    stunnel "$work/stunnel.conf" >/dev/null 2>&1 &
    local st=$!
    sleep 1
    timeout 3 socat -u /dev/null "TCP:127.0.0.1:$accept" || true
    wait "$rec"
    kill "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
}
stunnel_capture stunnel-auth route.example:443 'mig:s3cr:et'
stunnel_capture stunnel-noauth 192.0.2.10:6443 ''
stunnel_capture stunnel-ipv6-nodeport 'fd00::5:31234' 'mig:s3cr:et'
