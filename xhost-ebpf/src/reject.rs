//! `--deny reject`: a refused packet is answered by the datapath itself.
//!
//! The refused skb is rewritten in place into the answer, a TCP RST (RFC 793
//! reset generation) or an ICMP destination unreachable, code 13
//! (communication administratively prohibited) quoting the refused IPv4
//! header and the first 8 bytes after it; for IPv6 a TCP RST or an ICMPv6
//! destination unreachable, code 1 (communication with destination
//! administratively prohibited) quoting the refused packet as far as the
//! answer fits in 1280 bytes (RFC 4443 2.4(c)). The answer is sent back out
//! the device the packet came in on (`bpf_redirect` to that device's
//! egress). What is never answered, and the rate, are in docs/security.md;
//! in drop mode (the default) the verifier sees none of this (`DENY` is a
//! read-only constant).

use core::{mem::MaybeUninit, ptr::read_volatile};

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    btf_maps::PerCpuArray,
    helpers::{bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    macros::btf_map,
    programs::TcContext,
};
use network_types::eth::EthHdr;
use xhost_common::{DENY_DROP, DENY_REJECT, REJECT_BURST, REJECT_RATE_PER_SEC, stat};

use crate::{
    fib::zeroed_in,
    flow::coarse_now,
    parse::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    stats::count,
};

/// A buffer aligned to words, so [`zeroed_in`] can zero it: a zeroed array
/// literal compiles to a call into a BPF `memset` subprogram.
#[derive(Clone, Copy)]
#[repr(C, align(4))]
struct Words<T: Copy>(T);

/// `xhost_common::DENY_*`: what is done with refused packets. Set by the
/// loader (`xhost_common::GLOBAL_DENY`); drop unless it says.
#[unsafe(no_mangle)]
static DENY: u32 = DENY_DROP;

/// Whether refused packets are answered.
///
/// Verifier: `DENY` lives in the frozen read-only `.rodata` map, so in drop
/// mode every reply branch is dead code the verifier removes.
#[inline(always)]
pub fn rejecting() -> bool {
    // SAFETY: a plain load of a load-time constant.
    unsafe { read_volatile(&raw const DENY) == DENY_REJECT }
}

/// One CPU's reply budget: nanoseconds of credit, and when it was last
/// topped up.
#[repr(C)]
#[derive(Clone, Copy)]
struct Bucket {
    credit: u64,
    last: u64,
}

/// The token bucket of each CPU (slot 0).
#[btf_map]
static REJECT_BUCKET: PerCpuArray<Bucket, 1> = PerCpuArray::new();

/// Credit one reply costs.
const REPLY_NS: u64 = 1_000_000_000 / REJECT_RATE_PER_SEC;
/// Most credit a CPU can save up: `REJECT_BURST` replies.
const MAX_CREDIT_NS: u64 = REPLY_NS * REJECT_BURST;

const IPPROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PKT_FILTERED: u8 = 13;
/// TTL of the replies, Linux's default.
const REPLY_TTL: u8 = 64;
/// Most 32-bit words an ICMP reply quotes: a 60-byte IPv4 header + 8 bytes.
const QUOTE_MAX_WORDS: usize = 17;
/// Ethernet + IPv4 (no options) + ICMP header of the unreachable reply.
const ICMP_HDRS: usize = EthHdr::LEN + 20 + 8;
/// Ethernet + IPv4 (no options) + TCP (no options) of the RST.
const RST_LEN: usize = EthHdr::LEN + 20 + 20;

/// The action for a packet the datapath refuses: `TC_ACT_SHOT`, or in reject
/// mode, when the packet may be answered and the CPU's budget allows, the
/// answer redirected out the device it came in on. The caller counts the
/// refused packet under its drop reason; the answer is counted here
/// (`REJECT_SENT`), as is a refusal the budget left unanswered
/// (`REJECT_LIMITED`).
#[inline(always)]
pub fn refuse(ctx: &TcContext) -> i32 {
    if !rejecting() {
        return TC_ACT_SHOT;
    }
    answer(ctx).unwrap_or(TC_ACT_SHOT)
}

/// Takes one reply's credit from this CPU's bucket, if it has it.
#[inline(always)]
fn take_credit() -> bool {
    let Some(b) = REJECT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; networking programs do not nest on a CPU.
    let b = unsafe { &mut *b };
    let now = coarse_now();
    // The first reply finds `last` 0 and so a full bucket.
    let credit = b
        .credit
        .saturating_add(now.saturating_sub(b.last))
        .min(MAX_CREDIT_NS);
    b.last = now;
    if credit < REPLY_NS {
        b.credit = credit;
        return false;
    }
    b.credit = credit - REPLY_NS;
    true
}

/// Folds a one's complement sum of 16-bit words and complements it, in the
/// byte order the words were read in.
#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

/// Whether a refused packet may be answered at all: never to or from a
/// broadcast or multicast address (Ethernet group bit, IPv4 224.0.0.0 and
/// above), never from 0.0.0.0/8 or 127.0.0.0/8, never for a fragment other
/// than the first.
#[inline(always)]
fn answerable(eth: &[u8; 14], ip: &[u8; 20]) -> bool {
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    eth[0] & 1 == 0
        && eth[6] & 1 == 0
        && ip[16] < 224
        && ip[12] != 0
        && ip[12] != 127
        && ip[12] < 224
        && frag_offset == 0
}

/// Writes the answer over the refused packet and redirects it; `None`: not
/// answered (the caller drops the packet).
#[inline(always)]
fn answer(ctx: &TcContext) -> Option<i32> {
    let eth: [u8; 14] = ctx.load(0).ok()?;
    let ip: [u8; 20] = ctx.load(EthHdr::LEN).ok()?;
    let hdr_len = usize::from(ip[0] & 0x0f) * 4;
    // Verifier: the header length is bounded (IHL is 4 bits) before use.
    if !(20..=60).contains(&hdr_len) || !answerable(&eth, &ip) {
        return None;
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    // 0: a BIG TCP burst, as long as the skb (see parse.rs).
    let ip_len = if tot_len == 0 {
        (ctx.len() as usize).saturating_sub(EthHdr::LEN)
    } else {
        usize::from(tot_len)
    };
    let l4 = EthHdr::LEN + hdr_len;
    if ip[9] == IPPROTO_TCP {
        if ip_len < hdr_len + 20 {
            return None;
        }
        let tcp: [u8; 20] = ctx.load(l4).ok()?;
        if tcp[13] & TCP_RST != 0 {
            return None;
        }
        if !take_credit() {
            count(stat::REJECT_LIMITED, ctx.len());
            return None;
        }
        let payload = ip_len.saturating_sub(hdr_len + usize::from(tcp[12] >> 4) * 4) as u32;
        return send_rst(ctx, &eth, &ip, &tcp, payload);
    }
    if ip_len < hdr_len + 8 {
        return None;
    }
    if ip[9] == IPPROTO_ICMP {
        let icmp_type: u8 = ctx.load(l4).ok()?;
        // Only queries and replies: never an error (3, 4, 5, 11, 12) or a
        // type that is not assigned.
        if !matches!(icmp_type, 0 | 8 | 9 | 10 | 13..=18) {
            return None;
        }
    }
    // The refused header and 8 bytes after it, read before they move.
    let words = (hdr_len + 8) / 4;
    let mut quote_slot = MaybeUninit::<Words<[[u8; 4]; QUOTE_MAX_WORDS]>>::uninit();
    let quote = &mut zeroed_in(&mut quote_slot).0;
    let mut i = 0;
    // Verifier: a constant trip count.
    while i < QUOTE_MAX_WORDS {
        if i >= words {
            break;
        }
        quote[i] = ctx.load(EthHdr::LEN + i * 4).ok()?;
        i += 1;
    }
    if !take_credit() {
        count(stat::REJECT_LIMITED, ctx.len());
        return None;
    }
    send_unreachable(ctx, &eth, &ip, quote, words)
}

/// Ethernet and IPv4 header of an answer of `ip_len` bytes of IPv4 with
/// protocol `proto` and `frag` (flags), back to the refused packet's sender.
#[inline(always)]
fn reply_headers(
    r: &mut [u8],
    eth: &[u8; 14],
    ip: &[u8; 20],
    ip_len: u16,
    frag: u8,
    proto: u8,
) -> Option<()> {
    if r.len() < 34 {
        return None;
    }
    r[0..6].copy_from_slice(&eth[6..12]);
    r[6..12].copy_from_slice(&eth[0..6]);
    r[12] = 0x08;
    r[13] = 0x00;
    r[14] = 0x45;
    r[15] = 0;
    r[16..18].copy_from_slice(&ip_len.to_be_bytes());
    r[18] = 0;
    r[19] = 0;
    r[20] = frag;
    r[21] = 0;
    r[22] = REPLY_TTL;
    r[23] = proto;
    r[24] = 0;
    r[25] = 0;
    // From the refused packet's destination to its source.
    r[26..30].copy_from_slice(&ip[16..20]);
    r[30..34].copy_from_slice(&ip[12..16]);
    let mut sum = 0u32;
    let mut i = 14;
    while i < 34 {
        sum += u32::from(u16::from_ne_bytes([r[i], r[i + 1]]));
        i += 2;
    }
    r[24..26].copy_from_slice(&fold(sum));
    Some(())
}

/// RFC 793 reset generation: with an ACK, the reset's sequence number is
/// that ACK; without one, sequence 0 and an ACK of the segment's sequence
/// number plus its length (payload, SYN and FIN each count one).
#[inline(always)]
fn send_rst(
    ctx: &TcContext,
    eth: &[u8; 14],
    ip: &[u8; 20],
    tcp: &[u8; 20],
    payload: u32,
) -> Option<i32> {
    let mut slot = MaybeUninit::<Words<[u8; RST_LEN]>>::uninit();
    let r = &mut zeroed_in(&mut slot).0;
    // Don't fragment, as Linux sends its resets.
    reply_headers(r, eth, ip, 40, 0x40, IPPROTO_TCP)?;
    let flags = tcp[13];
    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        ([tcp[8], tcp[9], tcp[10], tcp[11]], [0; 4], TCP_RST)
    } else {
        let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        (
            [0; 4],
            seq.wrapping_add(len).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };
    // Ports swapped.
    r[34..36].copy_from_slice(&tcp[2..4]);
    r[36..38].copy_from_slice(&tcp[0..2]);
    r[38..42].copy_from_slice(&seq);
    r[42..46].copy_from_slice(&ack);
    r[46] = 0x50; // data offset 5: no options
    r[47] = out_flags;
    // Window, checksum, urgent pointer: 0 until the checksum below.
    // The pseudo-header: addresses, protocol, TCP length 20.
    let mut sum =
        u32::from(u16::from_ne_bytes([0, IPPROTO_TCP])) + u32::from(u16::from_ne_bytes([0, 20]));
    let mut i = 26;
    while i < RST_LEN {
        sum += u32::from(u16::from_ne_bytes([r[i], r[i + 1]]));
        i += 2;
    }
    r[50..52].copy_from_slice(&fold(sum));
    // SAFETY: plain helper call on this program's skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN as u32, 0) } != 0 {
        return None;
    }
    ctx.store(0, &*r, u64::from(BPF_F_RECOMPUTE_CSUM)).ok()?;
    back_out(ctx, RST_LEN as u32, stat::REJECT_SENT)
}

/// ICMP destination unreachable, communication administratively
/// prohibited, quoting `words` 32-bit words of the refused packet.
#[inline(always)]
fn send_unreachable(
    ctx: &TcContext,
    eth: &[u8; 14],
    ip: &[u8; 20],
    quote: &[[u8; 4]; QUOTE_MAX_WORDS],
    words: usize,
) -> Option<i32> {
    let words = words.min(QUOTE_MAX_WORDS);
    let icmp_len = 8 + words * 4;
    let mut slot = MaybeUninit::<Words<[u8; ICMP_HDRS]>>::uninit();
    let r = &mut zeroed_in(&mut slot).0;
    reply_headers(r, eth, ip, (20 + icmp_len) as u16, 0, IPPROTO_ICMP)?;
    r[34] = ICMP_DEST_UNREACH;
    r[35] = ICMP_PKT_FILTERED;
    // Checksum and the unused word: 0 until the checksum below.
    let mut sum = u32::from(u16::from_ne_bytes([r[34], r[35]]));
    let mut i = 0;
    while i < QUOTE_MAX_WORDS {
        if i >= words {
            break;
        }
        let w = quote[i];
        sum += u32::from(u16::from_ne_bytes([w[0], w[1]]));
        sum += u32::from(u16::from_ne_bytes([w[2], w[3]]));
        i += 1;
    }
    r[36..38].copy_from_slice(&fold(sum));
    let len = (EthHdr::LEN + 20 + icmp_len) as u32;
    // SAFETY: plain helper call on this program's skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return None;
    }
    ctx.store(0, &*r, u64::from(BPF_F_RECOMPUTE_CSUM)).ok()?;
    let mut i = 0;
    while i < QUOTE_MAX_WORDS {
        if i >= words {
            break;
        }
        ctx.store(
            ICMP_HDRS + i * 4,
            &quote[i],
            u64::from(BPF_F_RECOMPUTE_CSUM),
        )
        .ok()?;
        i += 1;
    }
    back_out(ctx, len, stat::REJECT_SENT)
}

/// Sends the answer (`len` bytes) out the device the refused packet came in
/// on, counted as `sent` (`REJECT_SENT` or `REJECT_SENT6`).
#[inline(always)]
fn back_out(ctx: &TcContext, len: u32, sent: u32) -> Option<i32> {
    // SAFETY: reading the ingress ifindex of the skb context.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(iif, 0) } as i32;
    count(sent, len);
    Some(action)
}

const ICMPV6_DEST_UNREACH: u8 = 1;
/// Communication with destination administratively prohibited.
const ICMPV6_ADM_PROHIBITED: u8 = 1;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const IPV6_HDR: usize = 40;
/// The IPv6 minimum MTU, which an ICMPv6 error must not exceed.
const IPV6_MIN_MTU: usize = 1280;
/// Most of the refused packet an ICMPv6 error quotes.
const QUOTE6_MAX: usize = IPV6_MIN_MTU - IPV6_HDR - 8;
/// 32-bit words of the longest quote.
const QUOTE6_MAX_WORDS: usize = QUOTE6_MAX / 4;
/// Ethernet + IPv6 + ICMPv6 header of the unreachable reply.
const ICMP6_HDRS: usize = EthHdr::LEN + IPV6_HDR + 8;
/// Ethernet + IPv6 + TCP (no options) of the RST.
const RST6_LEN: usize = EthHdr::LEN + IPV6_HDR + 20;

/// [`refuse`] for an IPv6 packet: a TCP RST, or ICMPv6 destination
/// unreachable, administratively prohibited (type 1, code 1); answers are
/// counted as `REJECT_SENT6`, refusals the budget left unanswered as
/// `REJECT_LIMITED6`. The budget is the same per-CPU bucket as IPv4's.
#[inline(always)]
pub fn refuse6(ctx: &TcContext) -> i32 {
    if !rejecting() {
        return TC_ACT_SHOT;
    }
    answer6(ctx).unwrap_or(TC_ACT_SHOT)
}

/// Whether a refused IPv6 packet may be answered at all (RFC 4443 2.4(e)):
/// never to or from an Ethernet group address, never for a multicast
/// destination, never to an unspecified, loopback or multicast source.
#[inline(always)]
fn answerable6(eth: &[u8; 14], ip: &[u8; IPV6_HDR]) -> bool {
    let mut unspecified_or_loopback = true;
    let mut i = 8;
    while i < 23 {
        if ip[i] != 0 {
            unspecified_or_loopback = false;
        }
        i += 1;
    }
    unspecified_or_loopback = unspecified_or_loopback && ip[23] <= 1;
    eth[0] & 1 == 0
        && eth[6] & 1 == 0
        && ip[8] != 0xff
        && ip[24] != 0xff
        && !unspecified_or_loopback
}

/// Writes the IPv6 answer over the refused packet and redirects it;
/// `None`: not answered (the caller drops the packet). Only TCP, UDP and
/// ICMPv6 echo right behind the fixed header are answered: behind an
/// extension header could be an ICMPv6 error or a fragment other than
/// the first, which are never answered.
#[inline(always)]
fn answer6(ctx: &TcContext) -> Option<i32> {
    let eth: [u8; 14] = ctx.load(0).ok()?;
    let ip: [u8; IPV6_HDR] = ctx.load(EthHdr::LEN).ok()?;
    if !answerable6(&eth, &ip) {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let l4 = EthHdr::LEN + IPV6_HDR;
    match ip[6] {
        IPPROTO_TCP => {
            if payload < 20 {
                return None;
            }
            let tcp: [u8; 20] = ctx.load(l4).ok()?;
            if tcp[13] & TCP_RST != 0 {
                return None;
            }
            if !take_credit() {
                count(stat::REJECT_LIMITED6, ctx.len());
                return None;
            }
            let data = payload.saturating_sub(usize::from(tcp[12] >> 4) * 4) as u32;
            return send_rst6(ctx, &eth, &ip, &tcp, data);
        }
        IPPROTO_UDP => {}
        IPPROTO_ICMPV6 => {
            // Only echo: never an error (types 0 to 127) or another
            // informational message.
            let icmp_type: u8 = ctx.load(l4).ok()?;
            if !matches!(icmp_type, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY) {
                return None;
            }
        }
        _ => return None,
    }
    if payload < 8 {
        return None;
    }
    if !take_credit() {
        count(stat::REJECT_LIMITED6, ctx.len());
        return None;
    }
    send_unreachable6(ctx, &eth, &ip, (IPV6_HDR + payload).min(QUOTE6_MAX))
}

/// Ethernet and IPv6 header of an answer with `payload` bytes of
/// `next_header` back to the refused packet's sender, and the sum of its
/// upper-layer pseudo-header.
#[inline(always)]
fn reply_headers6(
    r: &mut [u8],
    eth: &[u8; 14],
    ip: &[u8; IPV6_HDR],
    payload: u16,
    next_header: u8,
) -> Option<u32> {
    if r.len() < EthHdr::LEN + IPV6_HDR {
        return None;
    }
    r[0..6].copy_from_slice(&eth[6..12]);
    r[6..12].copy_from_slice(&eth[0..6]);
    r[12] = 0x86;
    r[13] = 0xdd;
    // Version 6, traffic class 0, flow label 0.
    r[14] = 0x60;
    r[15] = 0;
    r[16] = 0;
    r[17] = 0;
    r[18..20].copy_from_slice(&payload.to_be_bytes());
    r[20] = next_header;
    r[21] = REPLY_TTL;
    // From the refused packet's destination to its source.
    r[22..38].copy_from_slice(&ip[24..40]);
    r[38..54].copy_from_slice(&ip[8..24]);
    let len = payload.to_be_bytes();
    let mut sum =
        u32::from(u16::from_ne_bytes(len)) + u32::from(u16::from_ne_bytes([0, next_header]));
    let mut i = 22;
    while i < 54 {
        sum += u32::from(u16::from_ne_bytes([r[i], r[i + 1]]));
        i += 2;
    }
    Some(sum)
}

/// [`send_rst`] for IPv6.
#[inline(always)]
fn send_rst6(
    ctx: &TcContext,
    eth: &[u8; 14],
    ip: &[u8; IPV6_HDR],
    tcp: &[u8; 20],
    payload: u32,
) -> Option<i32> {
    let mut slot = MaybeUninit::<Words<[u8; RST6_LEN + 2]>>::uninit();
    let r = &mut zeroed_in(&mut slot).0;
    let mut sum = reply_headers6(r, eth, ip, 20, IPPROTO_TCP)?;
    let flags = tcp[13];
    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        ([tcp[8], tcp[9], tcp[10], tcp[11]], [0; 4], TCP_RST)
    } else {
        let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        (
            [0; 4],
            seq.wrapping_add(len).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };
    const T: usize = EthHdr::LEN + IPV6_HDR;
    r[T..T + 2].copy_from_slice(&tcp[2..4]);
    r[T + 2..T + 4].copy_from_slice(&tcp[0..2]);
    r[T + 4..T + 8].copy_from_slice(&seq);
    r[T + 8..T + 12].copy_from_slice(&ack);
    r[T + 12] = 0x50; // data offset 5: no options
    r[T + 13] = out_flags;
    let mut i = T;
    while i < RST6_LEN {
        sum += u32::from(u16::from_ne_bytes([r[i], r[i + 1]]));
        i += 2;
    }
    r[T + 16..T + 18].copy_from_slice(&fold(sum));
    // SAFETY: plain helper call on this program's skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST6_LEN as u32, 0) } != 0 {
        return None;
    }
    let out: &[u8; RST6_LEN] = r[..RST6_LEN].try_into().ok()?;
    ctx.store(0, out, u64::from(BPF_F_RECOMPUTE_CSUM)).ok()?;
    back_out(ctx, RST6_LEN as u32, stat::REJECT_SENT6)
}

/// ICMPv6 destination unreachable, administratively prohibited, quoting
/// the first `quote` bytes of the refused IPv6 packet (header included):
/// the packet is cut to them and the new headers inserted in front
/// (`bpf_skb_adjust_room`), so the quote is never copied.
#[inline(always)]
fn send_unreachable6(
    ctx: &TcContext,
    eth: &[u8; 14],
    ip: &[u8; IPV6_HDR],
    quote: usize,
) -> Option<i32> {
    let quote = quote.min(QUOTE6_MAX);
    let mut slot = MaybeUninit::<Words<[u8; ICMP6_HDRS + 2]>>::uninit();
    let r = &mut zeroed_in(&mut slot).0;
    let mut sum = reply_headers6(r, eth, ip, (8 + quote) as u16, IPPROTO_ICMPV6)?;
    const T: usize = EthHdr::LEN + IPV6_HDR;
    r[T] = ICMPV6_DEST_UNREACH;
    r[T + 1] = ICMPV6_ADM_PROHIBITED;
    sum += u32::from(u16::from_ne_bytes([r[T], r[T + 1]]));
    // The quote's sum, read where it lies now (after the Ethernet header).
    let words = quote / 4;
    let mut i = 0;
    // Verifier: a constant trip count.
    while i < QUOTE6_MAX_WORDS {
        if i >= words {
            break;
        }
        let w: [u8; 4] = ctx.load(EthHdr::LEN + i * 4).ok()?;
        sum += u32::from(u16::from_ne_bytes([w[0], w[1]]));
        sum += u32::from(u16::from_ne_bytes([w[2], w[3]]));
        i += 1;
    }
    // The last 1 to 3 bytes, zero-padded.
    let tail = quote % 4;
    if tail != 0 {
        let at = EthHdr::LEN + words * 4;
        let b0: u8 = ctx.load(at).ok()?;
        let b1: u8 = if tail > 1 { ctx.load(at + 1).ok()? } else { 0 };
        let b2: u8 = if tail > 2 { ctx.load(at + 2).ok()? } else { 0 };
        sum += u32::from(u16::from_ne_bytes([b0, b1]));
        sum += u32::from(u16::from_ne_bytes([b2, 0]));
    }
    r[T + 2..T + 4].copy_from_slice(&fold(sum));
    // Cut first: a cut GSO packet is no GSO packet any more
    // (`bpf_skb_change_tail` resets its GSO state).
    // SAFETY: plain helper calls on this program's skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (EthHdr::LEN + quote) as u32, 0) } != 0 {
        return None;
    }
    // SAFETY: as above.
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, (IPV6_HDR + 8) as i32, BPF_ADJ_ROOM_MAC, 0) } != 0
    {
        return None;
    }
    let out: &[u8; ICMP6_HDRS] = r[..ICMP6_HDRS].try_into().ok()?;
    ctx.store(0, out, u64::from(BPF_F_RECOMPUTE_CSUM)).ok()?;
    back_out(ctx, (ICMP6_HDRS + quote) as u32, stat::REJECT_SENT6)
}
