//! What cluster-lb and the program's primary process say to each other: the messages of
//! cluster-lb's Node preload (`node/cluster-lb-node.cjs`), which runs Node's own primary code
//! (`cluster.fork()`, `Worker`, every event) on top of them.
//!
//! Two channels. The preload's fork, adopt and kill requests need an answer before they
//! return (`cluster.fork()` returns a worker whose `process.pid` is set), so they go over a
//! blocking socket of their own, one JSON line each way ([`Request`], [`Answer`]). Everything
//! else goes over the process's Node channel as internal messages (their `cmd` starts with
//! `NODE_`, so no program listener sees them): what the primary sends its workers
//! ([`FromPrimary`]), and what its workers did ([`to_primary`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// Variables that name one process, not what a worker runs.
const PER_PROCESS: &[&str] = &[
    "NODE_UNIQUE_ID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// A request on the blocking channel.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// `cluster.fork()`: a worker started as it says, or one of the running workers.
    Fork(ForkSpec),
    /// The primary takes the worker it was offered (process `pid`).
    Adopt { pid: i32 },
    /// `worker.kill(signal)` / `worker.process.kill(signal)`.
    Kill { id: u32, pid: i32, signal: String },
}

/// What `child_process.fork` was asked to start, as Node's primary computes it from
/// `cluster.settings` and `cluster.fork(env)`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForkSpec {
    pub exec_path: String,
    pub exec_argv: Vec<String>,
    pub exec: String,
    pub args: Vec<String>,
    /// The whole environment (Node merges `process.env` and the fork's own).
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// `silent`: its stdout and stderr go to the primary's `worker.process.stdout/stderr`.
    #[serde(default)]
    pub silent: bool,
    /// What the preload saw: the command line's own program and environment (`settings`
    /// and `env` left as they were).
    #[serde(default)]
    pub default: bool,
}

impl ForkSpec {
    /// The command line it runs.
    pub fn command(&self) -> Vec<String> {
        let mut command = vec![self.exec_path.clone()];
        command.extend(self.exec_argv.iter().cloned());
        command.push(self.exec.clone());
        command.extend(self.args.iter().cloned());
        command
    }

    /// Equal as what runs: the same but for what differs from one process to the next (Node's
    /// worker id; the primary process's own socket-activation variables, which a restarted
    /// primary has anew).
    pub fn same_as(&self, other: &ForkSpec) -> bool {
        let without_id = |spec: &ForkSpec| {
            let mut spec = spec.clone();
            for key in PER_PROCESS {
                spec.env.remove(*key);
            }
            spec.default = false;
            spec
        };
        without_id(self) == without_id(other)
    }
}

/// Why a request line is not understood (the preload and cluster-lb disagree).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("a request that is not JSON: {0}")]
    NotJson(String),
    #[error("an unknown request {0:?}")]
    Unknown(String),
    #[error("a {op} request without a valid {field}")]
    Missing {
        op: &'static str,
        field: &'static str,
    },
    #[error("{0}")]
    Refused(String),
}

/// Reads one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let op = value.get("op").and_then(Value::as_str).unwrap_or("");
    let number = |op: &'static str, field: &'static str| {
        value
            .get(field)
            .and_then(Value::as_i64)
            .ok_or(RequestError::Missing { op, field })
    };
    match op {
        "fork" => {
            let spec = value.get("spec").cloned().unwrap_or(Value::Null);
            let refused = |what: &str| {
                spec.get(what)
                    .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
            };
            if refused("uid") || refused("gid") {
                return Err(RequestError::Refused(
                    "cluster.settings uid and gid are not supported: workers run as cluster-lb's --user".into(),
                ));
            }
            if spec.get("serialization").and_then(Value::as_str) == Some("advanced") {
                return Err(RequestError::Refused(
                    "serialization: 'advanced' is not supported by cluster-lb: messages are JSON (leave cluster.settings.serialization unset)".into(),
                ));
            }
            let spec: ForkSpec =
                serde_json::from_value(spec).map_err(|_| RequestError::Missing {
                    op: "fork",
                    field: "spec",
                })?;
            Ok(Request::Fork(spec))
        }
        "adopt" => Ok(Request::Adopt {
            pid: i32::try_from(number("adopt", "pid")?).map_err(|_| RequestError::Missing {
                op: "adopt",
                field: "pid",
            })?,
        }),
        "kill" => Ok(Request::Kill {
            id: u32::try_from(number("kill", "id")?).map_err(|_| RequestError::Missing {
                op: "kill",
                field: "id",
            })?,
            pid: i32::try_from(number("kill", "pid")?).map_err(|_| RequestError::Missing {
                op: "kill",
                field: "pid",
            })?,
            signal: value
                .get("signal")
                .and_then(Value::as_str)
                .unwrap_or("SIGTERM")
                .to_string(),
        }),
        other => Err(RequestError::Unknown(other.to_string())),
    }
}

/// The answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The worker (Node's `cluster.worker.id` and its pid).
    Worker {
        id: u32,
        pid: i32,
    },
    Done,
    /// `code` is Node's error code where there is one (`ESRCH`).
    Error {
        message: String,
        code: Option<String>,
    },
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let value = match self {
            Answer::Worker { id, pid } => json!({"id": id, "pid": pid}),
            Answer::Done => json!({"ok": true}),
            Answer::Error { message, code } => json!({"error": message, "code": code}),
        };
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// What the program's primary sends on its Node channel.
#[derive(Debug, PartialEq)]
pub enum FromPrimary {
    /// `worker.send(message)` (also Node's own internal messages to the worker, such as
    /// `disconnect`).
    Send { id: u32, message: Value },
    /// `worker.process.disconnect()`: close the worker's channel.
    Disconnect { id: u32 },
    /// Something else: the program's own `process.send()` (cluster-lb is not its parent in
    /// that sense), or an unknown request.
    Other,
}

/// Reads a `NODE_CLB_*` message of the primary (see `FromWorker::Clb`).
pub fn parse_from_primary(value: Value) -> FromPrimary {
    let cmd = value.get("cmd").and_then(Value::as_str).unwrap_or("");
    let id = value
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|id| u32::try_from(id).ok());
    match (cmd, id) {
        ("NODE_CLB_SEND", Some(id)) => {
            let Value::Object(mut object) = value else {
                return FromPrimary::Other;
            };
            FromPrimary::Send {
                id,
                message: object.remove("msg").unwrap_or(Value::Null),
            }
        }
        ("NODE_CLB_DISCONNECT", Some(id)) => FromPrimary::Disconnect { id },
        _ => FromPrimary::Other,
    }
}

/// Whether a message of the primary to a worker is Node's `disconnect` (`worker.disconnect()`,
/// `cluster.disconnect()`): the program lets the worker go.
pub fn is_disconnect(message: &Value) -> bool {
    message.get("cmd").and_then(Value::as_str) == Some("NODE_CLUSTER")
        && message.get("act").and_then(Value::as_str) == Some("disconnect")
}

/// Whether it is Node's reply to a worker's message that cluster-lb answered already (an
/// `ack` without an `act`: for `exitedAfterDisconnect`).
pub fn is_own_reply(message: &Value) -> bool {
    message.get("cmd").and_then(Value::as_str) == Some("NODE_CLUSTER")
        && message.get("ack").is_some()
        && message.get("act").is_none()
}

/// The messages to the primary about its workers.
pub mod to_primary {
    use serde_json::{json, Value};

    /// Worker `id` (process `pid`) runs and the primary did not fork it: it may take it.
    pub fn offer(id: u32, pid: i32) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "offer", "id": id, "pid": pid})
    }

    /// One of the worker's own cluster messages (`online`, `listening`,
    /// `exitedAfterDisconnect`).
    pub fn internal(id: u32, pid: i32, message: Value) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "internal", "id": id, "pid": pid, "msg": message})
    }

    /// The worker's `process.send(message)`.
    pub fn message(id: u32, pid: i32, message: Value) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "message", "id": id, "pid": pid, "msg": message})
    }

    pub fn disconnect(id: u32, pid: i32) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "disconnect", "id": id, "pid": pid})
    }

    /// `code` or `signal` (a name such as `SIGKILL`), the other null; `awaited` as in
    /// [`awaited`], as of this exit.
    pub fn exit(id: u32, pid: i32, code: Option<i32>, signal: Option<&str>, awaited: u32) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "exit", "id": id, "pid": pid, "code": code,
               "signal": signal, "awaited": awaited})
    }

    /// How many workers cluster-lb is starting or will offer that the primary has no Worker
    /// for: while any are, the primary stays up with no Worker left (a reload's replacement is
    /// offered right after the exit of the worker it replaces).
    pub fn awaited(count: u32) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "awaited", "count": count})
    }

    /// Output of a `silent` worker (`fd` 1 or 2), base64.
    pub fn output(id: u32, pid: i32, fd: u8, data: &str) -> Value {
        json!({"cmd": "NODE_CLB", "ev": "output", "id": id, "pid": pid, "fd": fd,
               "data": data})
    }

    /// What a worker said about itself, to replay to a primary that takes it later.
    pub fn online() -> Value {
        json!({"cmd": "NODE_CLUSTER", "act": "online"})
    }

    pub fn exited_after_disconnect() -> Value {
        json!({"cmd": "NODE_CLUSTER", "act": "exitedAfterDisconnect"})
    }

    /// Node's `listening` message, as its `worker.on('listening', address)` reads it (`fd`
    /// only when the listen named one: Node's JSON leaves an undefined one out).
    pub fn listening(
        address_type: Value,
        address: Option<&str>,
        port: Option<i64>,
        fd: Option<i64>,
    ) -> Value {
        let mut message = json!({"cmd": "NODE_CLUSTER", "act": "listening",
                                 "addressType": address_type, "address": address, "port": port});
        if let (Some(fd), Some(object)) = (fd, message.as_object_mut()) {
            object.insert("fd".into(), fd.into());
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_the_preload_are_understood() {
        let fork = br#"{"op":"fork","spec":{"execPath":"/usr/bin/node","execArgv":[],"exec":"/app/w.js","args":["a"],"env":{"A":"1","NODE_UNIQUE_ID":"3"},"cwd":null,"silent":false,"stdio":null,"serialization":null,"uid":null,"gid":null,"default":false}}"#;
        let Ok(Request::Fork(spec)) = parse_request(fork) else {
            panic!("not a fork");
        };
        assert_eq!(spec.command(), ["/usr/bin/node", "/app/w.js", "a"]);
        let mut other = spec.clone();
        other.env.insert("NODE_UNIQUE_ID".into(), "4".into());
        other.env.insert("LISTEN_PID".into(), "99".into());
        assert!(spec.same_as(&other), "another process of the same worker");
        other.env.insert("ROLE".into(), "scheduler".into());
        assert!(!spec.same_as(&other));
        assert_eq!(
            parse_request(br#"{"op":"adopt","pid":77}"#),
            Ok(Request::Adopt { pid: 77 })
        );
        assert_eq!(
            parse_request(br#"{"op":"kill","id":2,"pid":77,"signal":"SIGKILL"}"#),
            Ok(Request::Kill {
                id: 2,
                pid: 77,
                signal: "SIGKILL".into()
            })
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_a_reason() {
        let advanced = br#"{"op":"fork","spec":{"execPath":"n","execArgv":[],"exec":"a","args":[],"env":{},"serialization":"advanced"}}"#;
        assert!(
            matches!(parse_request(advanced), Err(RequestError::Refused(why)) if why.contains("advanced"))
        );
        let uid = br#"{"op":"fork","spec":{"execPath":"n","execArgv":[],"exec":"a","args":[],"env":{},"uid":1000}}"#;
        assert!(
            matches!(parse_request(uid), Err(RequestError::Refused(why)) if why.contains("uid"))
        );
        assert!(matches!(
            parse_request(b"{\"op\":\"adopt\"}"),
            Err(RequestError::Missing { .. })
        ));
        assert!(matches!(
            parse_request(b"nope"),
            Err(RequestError::NotJson(_))
        ));
        assert!(matches!(
            parse_request(br#"{"op":"explode"}"#),
            Err(RequestError::Unknown(_))
        ));
    }

    #[test]
    fn the_primarys_messages_to_its_workers_are_read() {
        let send = json!({"cmd": "NODE_CLB_SEND", "id": 2, "msg": {"hello": [1]}});
        assert_eq!(
            parse_from_primary(send),
            FromPrimary::Send {
                id: 2,
                message: json!({"hello": [1]})
            }
        );
        assert_eq!(
            parse_from_primary(json!({"cmd": "NODE_CLB_DISCONNECT", "id": 1})),
            FromPrimary::Disconnect { id: 1 }
        );
        assert_eq!(
            parse_from_primary(json!({"cmd": "NODE_CLB_SEND"})),
            FromPrimary::Other
        );
        assert!(is_disconnect(
            &json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": 3})
        ));
        assert!(is_own_reply(
            &json!({"cmd": "NODE_CLUSTER", "ack": 3, "seq": 4})
        ));
        assert!(!is_own_reply(
            &json!({"cmd": "NODE_CLUSTER", "act": "x", "ack": 3})
        ));
        assert_eq!(
            Answer::Worker { id: 1, pid: 9 }.encode(),
            b"{\"id\":1,\"pid\":9}\n"
        );
    }
}
