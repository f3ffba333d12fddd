//! The Docker VolumeDriver protocol: request parsing, dispatch to the driver, JSON replies.
//!
//! Pure request → response logic, independent of the transport (see [`crate::server`]). Field
//! names are exactly what Docker sends (PascalCase, `ID`); Docker sends no Content-Type and
//! Podman sends empty bodies for Activate and List. Errors are `{"Err": "..."}` with a non-200
//! status, which both engines read.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::driver::{Driver, VolumeInfo};
use crate::error::Error;

/// Largest request body we read.
pub const MAX_BODY: usize = 1 << 20;

/// The endpoints we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/Plugin.Activate`
    Activate,
    /// `/VolumeDriver.Create`
    Create,
    /// `/VolumeDriver.Remove`
    Remove,
    /// `/VolumeDriver.Mount`
    Mount,
    /// `/VolumeDriver.Unmount`
    Unmount,
    /// `/VolumeDriver.Path`
    Path,
    /// `/VolumeDriver.Get`
    Get,
    /// `/VolumeDriver.List`
    List,
    /// `/VolumeDriver.Capabilities`
    Capabilities,
}

impl Endpoint {
    /// The endpoint for a URL path.
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/Plugin.Activate" => Endpoint::Activate,
            "/VolumeDriver.Create" => Endpoint::Create,
            "/VolumeDriver.Remove" => Endpoint::Remove,
            "/VolumeDriver.Mount" => Endpoint::Mount,
            "/VolumeDriver.Unmount" => Endpoint::Unmount,
            "/VolumeDriver.Path" => Endpoint::Path,
            "/VolumeDriver.Get" => Endpoint::Get,
            "/VolumeDriver.List" => Endpoint::List,
            "/VolumeDriver.Capabilities" => Endpoint::Capabilities,
            _ => return None,
        })
    }

    /// True for calls that change state (logged at info).
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            Endpoint::Create | Endpoint::Remove | Endpoint::Mount | Endpoint::Unmount
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateReq {
    name: String,
    #[serde(default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NameReq {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MountReq {
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

/// A reply: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// 200, or the error's status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply { status: 200, body }
    }

    /// An `{"Err": ...}` reply with a status that fits the error.
    pub fn err(e: &Error) -> Self {
        let status = match e {
            Error::InvalidName(_) | Error::InvalidOption(_) | Error::BadRequest(_) => 400,
            Error::NoSuchVolume(_) => 404,
            Error::NotMounted { .. } | Error::InUse { .. } | Error::Conflict(_) => 409,
            _ => 500,
        };
        Reply {
            status,
            body: json!({ "Err": e.to_string() }),
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(ep: Endpoint, body: &[u8]) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::BadRequest(format!("{ep:?} needs a JSON body")));
    }
    serde_json::from_slice(body).map_err(|e| {
        // serde quotes the offending value: cut it, so a huge one does not come back whole.
        let msg = e.to_string();
        let msg = match msg.char_indices().nth(300) {
            Some((i, _)) => format!(
                "{}... (line {}, column {})",
                &msg[..i],
                e.line(),
                e.column()
            ),
            None => msg,
        };
        Error::BadRequest(format!("{ep:?}: {msg}"))
    })
}

fn volume_json(v: &VolumeInfo, with_status: bool) -> Value {
    let mut o = json!({
        "Name": v.name,
        "Mountpoint": v.mountpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "CreatedAt": v.created_at,
    });
    if with_status {
        o["Status"] = json!(v.status);
    }
    o
}

/// The volume a request names, for logs (best effort).
pub fn request_name(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get("Name")?
        .as_str()
        .map(str::to_string)
}

/// Handles one request. Blocking: call it off the async runtime.
pub fn handle(driver: &Driver, ep: Endpoint, body: &[u8]) -> Reply {
    let r: Result<Value, Error> = (|| match ep {
        Endpoint::Activate => {
            driver.activate();
            Ok(json!({ "Implements": ["VolumeDriver"] }))
        }
        Endpoint::Capabilities => Ok(json!({ "Capabilities": { "Scope": "local" } })),
        Endpoint::Create => {
            let r: CreateReq = parse(ep, body)?;
            driver.create(&r.name, &r.opts.unwrap_or_default())?;
            Ok(json!({}))
        }
        Endpoint::Remove => {
            let r: NameReq = parse(ep, body)?;
            driver.remove(&r.name)?;
            Ok(json!({}))
        }
        Endpoint::Mount => {
            let r: MountReq = parse(ep, body)?;
            let p = driver.mount(&r.name, &r.id)?;
            Ok(json!({ "Mountpoint": p.display().to_string() }))
        }
        Endpoint::Unmount => {
            let r: MountReq = parse(ep, body)?;
            driver.unmount(&r.name, &r.id)?;
            Ok(json!({}))
        }
        Endpoint::Path => {
            let r: NameReq = parse(ep, body)?;
            let p = driver.path(&r.name)?;
            Ok(json!({ "Mountpoint": p.map(|p| p.display().to_string()).unwrap_or_default() }))
        }
        Endpoint::Get => {
            let r: NameReq = parse(ep, body)?;
            let v = driver.get(&r.name)?;
            Ok(json!({ "Volume": volume_json(&v, true) }))
        }
        Endpoint::List => {
            let vols: Vec<Value> = driver
                .list()?
                .iter()
                .map(|v| volume_json(v, false))
                .collect();
            Ok(json!({ "Volumes": vols }))
        }
    })();
    match r {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(&e),
    }
}
