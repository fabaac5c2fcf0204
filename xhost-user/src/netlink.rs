//! A minimal rtnetlink client for the routes xhost installs: one request,
//! one acknowledgement. Constants from <linux/netlink.h> and
//! <linux/rtnetlink.h>.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::net::Ipv4Net;

/// Routing protocol id xhost marks its routes with (`ip route ... proto 177`).
pub const XHOST_RTPROT: u8 = 177;

const NETLINK_ROUTE: i32 = 0;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;
const AF_INET: u8 = 2;

/// A NETLINK_ROUTE socket of the calling thread's network namespace.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); ownership of the fd moves into OwnedFd.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh, owned descriptor.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// Adds `dst via gw dev oif` to the main table, marked as xhost's.
    /// Fails with `AlreadyExists` if any route for `dst` is there: an
    /// operator's route is never replaced (nor later deleted) by xhost.
    pub fn add_route(&mut self, dst: &Ipv4Net, gw: Ipv4Addr, oif: u32) -> io::Result<()> {
        self.route(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, dst, gw, oif)
    }

    /// Deletes the route `add_route` made.
    pub fn delete_route(&mut self, dst: &Ipv4Net, gw: Ipv4Addr, oif: u32) -> io::Result<()> {
        self.route(RTM_DELROUTE, 0, dst, gw, oif)
    }

    fn route(
        &mut self,
        kind: u16,
        flags: u16,
        dst: &Ipv4Net,
        gw: Ipv4Addr,
        oif: u32,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(64);
        // struct nlmsghdr; the length is patched in below.
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        msg.extend_from_slice(&[
            AF_INET,
            dst.len(),
            0,
            0,
            RT_TABLE_MAIN,
            XHOST_RTPROT,
            0,
            RTN_UNICAST,
        ]);
        msg.extend_from_slice(&0u32.to_ne_bytes());
        for (ty, data) in [
            (RTA_DST, dst.addr().octets()),
            (RTA_GATEWAY, gw.octets()),
            (RTA_OIF, oif.to_ne_bytes()),
        ] {
            msg.extend_from_slice(&8u16.to_ne_bytes());
            msg.extend_from_slice(&ty.to_ne_bytes());
            msg.extend_from_slice(&data);
        }
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: sending an initialised buffer to the kernel (nl_pid 0).
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        self.ack()
    }

    /// Reads until the NLMSG_ERROR answering our sequence number.
    fn ack(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into a buffer we own, bounded by its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or_default());
                if len < 16 || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                if ty == NLMSG_ERROR && seq == self.seq && len >= 20 {
                    let err =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-err))
                    };
                }
                off += (len + 3) & !3;
            }
        }
    }
}
