#!/usr/bin/env bash
# The local single-node Apache Kafka broker (KRaft mode), for laptops and tests.
#
#   deploy/kafka/kafka.sh fetch    download the pinned broker jars (Maven Central, deploy/kafka/pom.xml)
#   deploy/kafka/kafka.sh start    format storage once, start, wait until it accepts connections
#   deploy/kafka/kafka.sh stop     stop cleanly (SIGTERM, then SIGKILL after a timeout)
#   deploy/kafka/kafka.sh status   say whether it runs; exit 0 when it does
#
# Idempotent: start while running is a no-op, stop while stopped is a no-op, a stale PID file is removed.
# Knobs (environment): KLINES_STATE_DIR (default .state in the repo), KAFKA_PORT (9092),
# KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), KAFKA_HEAP_OPTS (-Xms512m -Xmx1g), KAFKA_START_TIMEOUT (60 s).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${KLINES_STATE_DIR:-$repo/.state}"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
libs="${KAFKA_LIBS_DIR:-$state/kafka-libs}"
dir="$state/kafka-$port"
pidfile="$dir/broker.pid"
log="$dir/broker.log"
timeout="${KAFKA_START_TIMEOUT:-60}"

say() { printf 'kafka: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
    [[ -f "$pidfile" ]] || return 1
    local pid
    pid="$(cat "$pidfile")"
    # A PID file may outlive its broker (crash, reboot); the PID may even belong to another process by now.
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && grep -q "kafka.Kafka" "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$pid"
        return 0
    fi
    say "removing stale PID file ($pid is not a running broker)"
    rm -f "$pidfile"
    return 1
}

fetch() {
    if [[ -f "$libs/.complete" && "$libs/.complete" -nt "$here/pom.xml" ]]; then
        return 0
    fi
    say "fetching broker jars into $libs (mvn dependency:copy-dependencies)"
    rm -rf "$libs"
    mkdir -p "$libs"
    mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs" >&2
    ls "$libs"/kafka_2.13-*.jar >/dev/null
    touch "$libs/.complete"
}

java_cmd() { java ${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g} -XX:+UseG1GC -Dlog4j2.configurationFile="$here/log4j2.properties" -cp "$libs/*" "$@"; }

write_config() {
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
log.cleaner.backoff.ms=1000
EOF
}

start() {
    if pid="$(running_pid)"; then
        say "already running (pid $pid) on 127.0.0.1:$port"
        return 0
    fi
    if port_open "$port"; then
        say "port $port is taken by another process; set KAFKA_PORT, or KAFKA_BOOTSTRAP to use that broker"
        return 1
    fi
    fetch
    write_config
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        local cluster_id
        cluster_id="$(java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
        java_cmd kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" >>"$log" 2>&1
    fi
    local t0=$SECONDS
    # setsid: the broker must not die with the shell that started it (Ctrl-C in a terminal, a test's session).
    setsid bash -c "exec java ${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g} -XX:+UseG1GC -Dlog4j2.configurationFile='$here/log4j2.properties' -cp '$libs/*' kafka.Kafka '$dir/server.properties'" \
        >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    while ! port_open "$port"; do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            rm -f "$pidfile"
            say "broker exited during start; last lines of $log:"
            tail -n 20 "$log" >&2
            return 1
        fi
        if ((SECONDS - t0 > timeout)); then
            say "broker did not accept connections within ${timeout}s; see $log"
            stop
            return 1
        fi
        sleep 0.2
    done
    say "started (pid $(cat "$pidfile")) on 127.0.0.1:$port in $((SECONDS - t0))s; data in $dir"
}

stop() {
    local pid
    if ! pid="$(running_pid)"; then
        say "not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "broker did not stop within 30s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    say "stopped"
}

status() {
    if pid="$(running_pid)"; then
        echo "running (pid $pid) on 127.0.0.1:$port"
    else
        echo "stopped"
        return 1
    fi
}

case "${1:-}" in
    fetch) fetch ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 fetch|start|stop|status" >&2
        exit 2
        ;;
esac
