//! Link settings that iproute2 6.1 (Debian 12's) has no keyword for, set over rtnetlink.

use std::os::fd::AsRawFd as _;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

use crate::{Error, NetNs, Result};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// The longest GSO burst the stack builds for IPv4 on a device (Linux 6.3+); above
/// 65 536 it is BIG TCP.
const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Sets `iface`'s `gso_ipv4_max_size` in `ns` and returns what the kernel reports
/// afterwards, 0 when it reports none: a kernel without BIG TCP ignores the attribute, so
/// callers compare.
pub fn set_gso_ipv4_max_size(ns: &NetNs, iface: &str, size: u32) -> Result<u32> {
    let iface = iface.to_owned();
    ns.within("gso_ipv4_max_size", move || {
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .map_err(|e| io_error(format!("link {iface}"), e))?;
        let mut attr = Vec::with_capacity(8);
        attr.extend_from_slice(&8u16.to_ne_bytes());
        attr.extend_from_slice(&IFLA_GSO_IPV4_MAX_SIZE.to_ne_bytes());
        attr.extend_from_slice(&size.to_ne_bytes());
        let reply = request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, index, &attr)?;
        match u16::from_ne_bytes([reply[4], reply[5]]) {
            NLMSG_ERROR if reply.len() >= NLMSG_HDRLEN + 4 => {
                let errno = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
                if errno != 0 {
                    return Err(io_error(
                        format!("setting gso_ipv4_max_size {size} on {iface}"),
                        nix::errno::Errno::from_raw(-errno),
                    ));
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "setting gso_ipv4_max_size on {iface}: netlink answered type {other}"
                )));
            }
        }
        let reply = request(RTM_GETLINK, NLM_F_REQUEST, index, &[])?;
        Ok(link_attr_u32(&reply, IFLA_GSO_IPV4_MAX_SIZE).unwrap_or(0))
    })
}

/// One rtnetlink request about link `index` (an `ifinfomsg` and `attrs`); the first reply
/// message.
fn request(kind: u16, flags: u16, index: u32, attrs: &[u8]) -> Result<Vec<u8>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| io_error("netlink socket".into(), e))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
        .map_err(|e| io_error("netlink bind".into(), e))?;
    let len = NLMSG_HDRLEN + IFINFOMSG_LEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).expect("short").to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[0, 0, 0, 0]);
    msg.extend_from_slice(&index.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(attrs);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty())
        .map_err(|e| io_error("netlink send".into(), e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| io_error("netlink recv".into(), e))?;
    if n < NLMSG_HDRLEN {
        return Err(Error::Config(format!("netlink reply of {n} bytes")));
    }
    let first = usize::try_from(u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")))
        .unwrap_or(n)
        .min(n);
    buf.truncate(first);
    Ok(buf)
}

/// The u32 attribute `kind` of an `RTM_NEWLINK` reply.
fn link_attr_u32(reply: &[u8], kind: u16) -> Option<u32> {
    let mut at = NLMSG_HDRLEN + IFINFOMSG_LEN;
    while at + 4 <= reply.len() {
        let len = usize::from(u16::from_ne_bytes([reply[at], reply[at + 1]]));
        let t = u16::from_ne_bytes([reply[at + 2], reply[at + 3]]) & 0x3fff;
        if len < 4 || at + len > reply.len() {
            return None;
        }
        if t == kind && len == 8 {
            return Some(u32::from_ne_bytes(
                reply[at + 4..at + 8].try_into().expect("4 bytes"),
            ));
        }
        at += len.div_ceil(4) * 4;
    }
    None
}

fn io_error(what: String, e: nix::errno::Errno) -> Error {
    Error::Io {
        what,
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_attributes_are_found_past_others_and_padding() {
        let mut reply = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        // IFLA_IFNAME "eth0\0": 9 bytes, padded to 12.
        reply.extend_from_slice(&9u16.to_ne_bytes());
        reply.extend_from_slice(&3u16.to_ne_bytes());
        reply.extend_from_slice(b"eth0\0\0\0\0");
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&IFLA_GSO_IPV4_MAX_SIZE.to_ne_bytes());
        reply.extend_from_slice(&131_072u32.to_ne_bytes());
        assert_eq!(link_attr_u32(&reply, IFLA_GSO_IPV4_MAX_SIZE), Some(131_072));
        assert_eq!(link_attr_u32(&reply, 64), None);
        // A length running past the message ends the walk.
        let mut broken = reply.clone();
        broken[NLMSG_HDRLEN + IFINFOMSG_LEN] = 200;
        assert_eq!(link_attr_u32(&broken, IFLA_GSO_IPV4_MAX_SIZE), None);
    }
}
