#!/usr/bin/env bash
# Make sure the real Redis and PostgreSQL the tests and the demo talk to are up on loopback:
# use them if they answer, start them if installed but stopped, install them (Debian) where missing.
set -euo pipefail
need_pg="${NEED_POSTGRES:-1}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then $SUDO apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
wait_for() {  # wait_for <seconds> <command...>
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }
if ! (command -v redis-cli >/dev/null && redis_up); then
  command -v redis-server >/dev/null || { echo "installing redis-server"; apt_install redis-server; }
  if ! redis_up 2>/dev/null; then
    echo "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
    wait_for 20 redis_up || { echo "redis did not come up" >&2; exit 1; }
  fi
fi
echo "redis: up"

if [ "$need_pg" = "1" ]; then
  pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
  if ! (command -v pg_isready >/dev/null && pg_up); then
    [ -d /etc/postgresql ] && ls /etc/postgresql/*/main >/dev/null 2>&1 || { echo "installing postgresql"; apt_install postgresql; }
    if ! pg_up; then
      ver=$(ls /etc/postgresql | sort -V | tail -n 1)
      echo "starting postgresql $ver"
      # trust auth on loopback, as the tests expect
      hba="/etc/postgresql/$ver/main/pg_hba.conf"
      grep -q "^host all all 127.0.0.1/32 trust" "$hba" || sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
      wait_for 30 pg_up || { echo "postgresql did not come up" >&2; exit 1; }
    fi
  fi
  echo "postgresql: up"
fi
