//! Node's cluster wire protocol in `json` serialization mode, as a primary sees it: one JSON
//! value per line; internal messages are objects whose `cmd` starts with `NODE_`; a listening
//! socket travels as a `NODE_HANDLE` line with the fd attached (SCM_RIGHTS).
//!
//! Parsing never panics and never trusts the worker: a line that is not JSON is an error (the
//! caller treats the worker as broken); an internal message this primary does not act on is
//! returned as such, to be ignored. Every line built here is valid JSON ending in one newline,
//! because a worker dies on anything else (node-ipc.md §2.1).
//!
//! `channel` is the primary's end of the socket; `detect` tells whether a program is Node;
//! `primary` is what cluster-lb and a Node program's own primary process say.

pub mod channel;
pub mod detect;
pub mod primary;

use serde_json::{json, Value};

/// The kinds of address a `queryServer` asks for (`addressType` in Node's message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AddressType {
    Tcp4,
    Tcp6,
    Udp4,
    Udp6,
    /// A Unix-domain socket path (`addressType: -1`).
    Pipe,
    /// `listen({ fd })`: `addressType: null`, and `fd` names the worker's own descriptor.
    Fd,
}

/// One `queryServer` (or the `listening` that follows it).
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The worker's `seq` for this message: the reply's `ack`.
    pub seq: u64,
    /// Counts concurrent listens on the same tuple in this worker.
    pub index: u64,
    /// Server data (TLS: `{"ticketKeys": hex}`), else null.
    pub data: Value,
    /// `None`: no host was given (all addresses).
    pub address: Option<String>,
    /// `None` for the fd form; 0 for an ephemeral port; -1 for pipes.
    pub port: Option<i64>,
    pub address_type: AddressType,
    /// The worker's own fd number, for `listen({ fd })`.
    pub fd: Option<i64>,
    /// TCP: 1 = IPV6_V6ONLY. UDP: 1 = IPV6_V6ONLY, 4 = SO_REUSEADDR.
    pub flags: u64,
    /// A pipe's `readableAll` and `writableAll`: everyone may read, write the socket file.
    pub readable_all: bool,
    pub writable_all: bool,
}

impl Query {
    pub fn is_udp(&self) -> bool {
        matches!(self.address_type, AddressType::Udp4 | AddressType::Udp6)
    }
}

/// What a Node worker says.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// `online`: the worker runs (sent before any user code).
    Online,
    QueryServer(Query),
    /// A server of the worker listens; `port` is the real one.
    Listening(Query),
    /// A server closed; `key` is the one this primary gave it.
    Close {
        key: String,
    },
    /// The worker leaves by itself (`cluster.worker.disconnect()`, `.kill()`); it waits for an
    /// `ack` of this `seq`.
    ExitedAfterDisconnect {
        seq: u64,
    },
    /// A handle the worker sent with `process.send(msg, handle)`: must be acknowledged.
    Handle,
    /// The worker's acknowledgement of a handle this primary sent.
    HandleAck,
    /// The worker could not take a handle this primary sent (no fd arrived).
    HandleNack,
    /// A cluster message this primary does not act on (an unknown `act`, a stray `ack`).
    OtherCluster(Value),
    /// Another internal `NODE_*` message (ignored).
    OtherInternal(String),
    /// A user message: `process.send(value)`.
    User(Value),
    /// A message of cluster-lb's own Node preload (`cmd` starts with `NODE_CLB`): a worker says
    /// the program reads `cluster.isPrimary`, or the program's primary asks for something.
    Clb(Value),
}

/// Why a line from the worker cannot be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a line that is not JSON: {0}")]
    NotJson(String),
    #[error("a line that is not UTF-8")]
    NotUtf8,
    #[error("a {act} message without {field}")]
    Missing {
        act: &'static str,
        field: &'static str,
    },
}

/// Node's test for an internal message (`isInternal` in lib/internal/child_process.js).
fn internal_command(value: &Value) -> Option<&str> {
    let cmd = value.get("cmd")?.as_str()?;
    (cmd.len() > 5 && cmd.starts_with("NODE_")).then_some(cmd)
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<FromWorker, LineError> {
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|e| LineError::NotJson(e.to_string()))?;
    let Some(cmd) = internal_command(&value) else {
        return Ok(FromWorker::User(value));
    };
    match cmd {
        "NODE_CLUSTER" => parse_cluster(value),
        "NODE_HANDLE" => Ok(FromWorker::Handle),
        "NODE_HANDLE_ACK" => Ok(FromWorker::HandleAck),
        "NODE_HANDLE_NACK" => Ok(FromWorker::HandleNack),
        clb if clb.starts_with("NODE_CLB") => Ok(FromWorker::Clb(value)),
        other => Ok(FromWorker::OtherInternal(other.to_string())),
    }
}

fn parse_cluster(value: Value) -> Result<FromWorker, LineError> {
    let act = value.get("act").and_then(Value::as_str).unwrap_or("");
    let seq = value.get("seq").and_then(Value::as_u64);
    match act {
        "online" => Ok(FromWorker::Online),
        "queryServer" => parse_query(&value, "queryServer").map(FromWorker::QueryServer),
        "listening" => parse_query(&value, "listening").map(FromWorker::Listening),
        "close" => {
            let key = value
                .get("key")
                .and_then(Value::as_str)
                .ok_or(LineError::Missing {
                    act: "close",
                    field: "key",
                })?;
            Ok(FromWorker::Close {
                key: key.to_string(),
            })
        }
        "exitedAfterDisconnect" => Ok(FromWorker::ExitedAfterDisconnect {
            seq: seq.ok_or(LineError::Missing {
                act: "exitedAfterDisconnect",
                field: "seq",
            })?,
        }),
        _ => Ok(FromWorker::OtherCluster(value)),
    }
}

fn parse_query(value: &Value, act: &'static str) -> Result<Query, LineError> {
    let missing = |field| LineError::Missing { act, field };
    let seq = value
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(missing("seq"))?;
    let fd = value.get("fd").and_then(Value::as_i64);
    let address_type = match value.get("addressType") {
        Some(Value::String(kind)) if kind == "udp4" => AddressType::Udp4,
        Some(Value::String(kind)) if kind == "udp6" => AddressType::Udp6,
        Some(Value::Number(n)) if n.as_i64() == Some(6) => AddressType::Tcp6,
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => AddressType::Pipe,
        Some(Value::Number(_)) => AddressType::Tcp4,
        _ if fd.is_some_and(|fd| fd >= 0) => AddressType::Fd,
        _ => return Err(missing("addressType")),
    };
    Ok(Query {
        seq,
        index: value.get("index").and_then(Value::as_u64).unwrap_or(0),
        data: value.get("data").cloned().unwrap_or(Value::Null),
        address: value
            .get("address")
            .and_then(Value::as_str)
            .map(str::to_string),
        port: value.get("port").and_then(Value::as_i64),
        address_type,
        fd,
        flags: value.get("flags").and_then(Value::as_u64).unwrap_or(0),
        readable_all: value.get("readableAll").and_then(Value::as_bool) == Some(true),
        writable_all: value.get("writableAll").and_then(Value::as_bool) == Some(true),
    })
}

/// What this primary says; each becomes one line.
#[derive(Clone, Debug, PartialEq)]
pub enum ToWorker {
    /// The answer to a `queryServer` that carries the socket (the fd travels with this line).
    Handle {
        ack: u64,
        seq: u64,
        key: String,
        data: Value,
        udp: bool,
    },
    /// The answer to a `queryServer` that refuses it: the worker's server emits 'error' with
    /// this errno (negative, libuv style).
    Refuse {
        ack: u64,
        seq: u64,
        key: String,
        errno: i32,
    },
    /// Close your servers and exit when idle.
    Disconnect { seq: u64 },
    /// Acknowledges the worker's `exitedAfterDisconnect`.
    Ack { ack: u64, seq: u64 },
    /// Acknowledges a handle the worker sent.
    HandleAck,
    /// No fd arrived with the worker's handle.
    HandleNack,
    /// A user message: `process.on('message')` in the worker.
    User(Value),
    /// To the program's primary process: what its workers did (`{"cmd":"NODE_CLB",...}`),
    /// which cluster-lb's preload there turns into Node's own worker events.
    Clb(Value),
}

impl ToWorker {
    /// The line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let value = match self {
            ToWorker::Handle {
                ack,
                seq,
                key,
                data,
                udp,
            } => json!({
                "cmd": "NODE_HANDLE",
                "type": if *udp { "dgram.Native" } else { "net.Native" },
                "msg": {"cmd": "NODE_CLUSTER", "errno": 0, "key": key, "ack": ack,
                        "data": data, "seq": seq},
            }),
            ToWorker::Refuse {
                ack,
                seq,
                key,
                errno,
            } => json!({"cmd": "NODE_CLUSTER", "errno": errno, "key": key, "ack": ack,
                        "data": Value::Null, "seq": seq}),
            ToWorker::Disconnect { seq } => {
                json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": seq})
            }
            ToWorker::Ack { ack, seq } => json!({"cmd": "NODE_CLUSTER", "ack": ack, "seq": seq}),
            ToWorker::HandleAck => json!({"cmd": "NODE_HANDLE_ACK"}),
            ToWorker::HandleNack => json!({"cmd": "NODE_HANDLE_NACK"}),
            ToWorker::User(value) | ToWorker::Clb(value) => value.clone(),
        };
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        line
    }

    /// Whether it carries a socket (and must wait for the worker's acknowledgement).
    pub fn carries_handle(&self) -> bool {
        matches!(self, ToWorker::Handle { .. })
    }
}

/// Whether a query's `data` is what Node's TLS server sends (`{"ticketKeys": hex}`, 48 bytes
/// in hex: `_getServerData` in lib/_tls_wrap.js) and takes back (`setTicketKeys` throws on
/// anything else, which would kill the worker at listen).
pub fn is_valid_server_data(data: &Value) -> bool {
    let Some(object) = data.as_object() else {
        return false;
    };
    let keys = object.get("ticketKeys").and_then(Value::as_str);
    object.len() == 1
        && keys.is_some_and(|hex| hex.len() == 96 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A user message from the primary must not look internal to the worker, or Node would
/// route it to its cluster code instead of `process.on('message')`.
pub fn is_plain_user_message(value: &Value) -> bool {
    internal_command(value).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_node_sends_is_understood() {
        // Verbatim from Node 20 and 22 (node-ipc.md §4).
        assert_eq!(
            parse_line(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            Ok(FromWorker::Online)
        );
        let query = parse_line(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":18080,"addressType":4,"backlog":0,"seq":1}"#).unwrap();
        assert_eq!(
            query,
            FromWorker::QueryServer(Query {
                seq: 1,
                index: 0,
                data: Value::Null,
                address: None,
                port: Some(18080),
                address_type: AddressType::Tcp4,
                fd: None,
                flags: 0,
                readable_all: false,
                writable_all: false,
            })
        );
        let FromWorker::QueryServer(udp) = parse_line(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":18081,"addressType":"udp4","fd":-1,"flags":0,"seq":1}"#).unwrap() else {
            panic!("not a query");
        };
        assert!(udp.is_udp());
        let FromWorker::QueryServer(fd) = parse_line(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":null,"addressType":null,"fd":3,"seq":1}"#).unwrap() else {
            panic!("not a query");
        };
        assert_eq!((fd.address_type, fd.fd), (AddressType::Fd, Some(3)));
        let FromWorker::QueryServer(pipe) = parse_line(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"/tmp/a.sock","port":-1,"addressType":-1,"readableAll":true,"backlog":0,"seq":1}"#).unwrap() else {
            panic!("not a query")
        };
        assert_eq!(pipe.address_type, AddressType::Pipe);
        assert!(pipe.readable_all && !pipe.writable_all);
        let FromWorker::QueryServer(tls) = parse_line(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":{"ticketKeys":"ab"},"address":null,"port":18443,"addressType":4,"flags":0,"backlog":0,"seq":1}"#).unwrap() else {
            panic!("not a query");
        };
        assert_eq!(tls.data, json!({"ticketKeys": "ab"}));
        assert_eq!(
            parse_line(br#"{"cmd":"NODE_CLUSTER","act":"close","key":"k","seq":3}"#),
            Ok(FromWorker::Close { key: "k".into() })
        );
        assert_eq!(
            parse_line(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":4}"#),
            Ok(FromWorker::ExitedAfterDisconnect { seq: 4 })
        );
        assert_eq!(
            parse_line(br#"{"cmd":"NODE_HANDLE_ACK"}"#),
            Ok(FromWorker::HandleAck)
        );
        assert_eq!(
            parse_line(br#"{"hello":1}"#),
            Ok(FromWorker::User(json!({"hello": 1})))
        );
        assert_eq!(parse_line(br#""x""#), Ok(FromWorker::User(json!("x"))));
        // `cmd` must be longer than 5 characters to be internal: NODE_ alone is a user message.
        assert_eq!(
            parse_line(br#"{"cmd":"NODE_"}"#),
            Ok(FromWorker::User(json!({"cmd": "NODE_"})))
        );
    }

    #[test]
    fn broken_lines_are_named() {
        assert!(matches!(
            parse_line(b"not json"),
            Err(LineError::NotJson(_))
        ));
        assert_eq!(parse_line(b"\xff\xfe"), Err(LineError::NotUtf8));
        assert!(matches!(
            parse_line(br#"{"cmd":"NODE_CLUSTER","act":"close"}"#),
            Err(LineError::Missing { .. })
        ));
        assert!(matches!(
            parse_line(br#"{"cmd":"NODE_CLUSTER","act":"weird","seq":9}"#),
            Ok(FromWorker::OtherCluster(_))
        ));
    }

    #[test]
    fn replies_have_the_shape_node_accepts() {
        let handle = ToWorker::Handle {
            ack: 1,
            seq: 0,
            key: "clb:7".into(),
            data: Value::Null,
            udp: false,
        };
        assert_eq!(
            String::from_utf8(handle.encode()).unwrap(),
            "{\"cmd\":\"NODE_HANDLE\",\"msg\":{\"ack\":1,\"cmd\":\"NODE_CLUSTER\",\"data\":null,\"errno\":0,\"key\":\"clb:7\",\"seq\":0},\"type\":\"net.Native\"}\n"
        );
        let refuse = ToWorker::Refuse {
            ack: 1,
            seq: 2,
            key: "k".into(),
            errno: -98,
        };
        let line = refuse.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["errno"], -98);
        assert_eq!(
            ToWorker::Disconnect { seq: 5 }.encode(),
            b"{\"act\":\"disconnect\",\"cmd\":\"NODE_CLUSTER\",\"seq\":5}\n"
        );
        // A user message with a newline inside a string stays one line.
        let user = ToWorker::User(json!({"text": "a\nb"})).encode();
        assert_eq!(user.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(!is_plain_user_message(&json!({"cmd": "NODE_HANDLE_ACK"})));
        let keys = "0123456789abcdef".repeat(6);
        assert!(is_valid_server_data(&json!({"ticketKeys": keys})));
        for bad in [
            json!({"ticketKeys": &keys[..94]}),
            json!({"ticketKeys": keys.replace('a', "z")}),
            json!({"ticketKeys": keys, "more": 1}),
            json!({"ticketKeys": 5}),
            json!("ticketKeys"),
        ] {
            assert!(!is_valid_server_data(&bad), "{bad}");
        }
        assert!(is_plain_user_message(&json!({"cmd": "hello"})));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_line(&bytes);
        }

        #[test]
        fn parsing_cluster_like_objects_never_panics(
            act in "(online|queryServer|listening|close|exitedAfterDisconnect|[a-z]{0,6})",
            fields in proptest::collection::vec(("[a-zA-Z]{1,12}", prop_oneof![
                Just(Value::Null), any::<i64>().prop_map(Value::from), "[ -~]{0,8}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from)]), 0..8),
        ) {
            let mut object = serde_json::Map::new();
            object.insert("cmd".into(), json!("NODE_CLUSTER"));
            object.insert("act".into(), json!(act));
            for (key, value) in fields {
                object.insert(key, value);
            }
            let _ = parse_line(Value::Object(object).to_string().as_bytes());
        }

        #[test]
        fn every_line_sent_is_one_line_of_json(text in "\\PC{0,40}", n in any::<i64>()) {
            for message in [ToWorker::User(json!({"s": text, "n": n})), ToWorker::Refuse { ack: 1, seq: 2, key: text.clone(), errno: -98 }] {
                let line = message.encode();
                prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
                prop_assert!(serde_json::from_slice::<Value>(&line).is_ok());
            }
        }
    }
}
