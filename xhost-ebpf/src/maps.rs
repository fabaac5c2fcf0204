//! The routing state the agent writes and the datapath reads.

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use xhost_common::{
    Endpoint, LocalNet, MAX_ENDPOINTS, MAX_LOCAL_NETS, MAX_PEER_HOSTS, MAX_ROUTES, Peer, PeerHost,
};

/// Remote container prefixes -> the peer host that owns them.
#[btf_map]
pub static ROUTES: LpmTrie<[u8; 4], Peer, { MAX_ROUTES as usize }> = LpmTrie::new();

/// This host's container subnets (docker0, user bridges).
#[btf_map]
pub static LOCAL_NETS: LpmTrie<[u8; 4], LocalNet, { MAX_LOCAL_NETS as usize }> = LpmTrie::new();

/// Local container IPv4 (network order) -> its veth endpoint.
#[btf_map]
pub static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Underlay addresses of the peer hosts (network order).
#[btf_map]
pub static PEER_HOSTS: HashMap<[u8; 4], PeerHost, { MAX_PEER_HOSTS as usize }> = HashMap::new();

/// Longest-prefix match of a single address.
#[inline(always)]
pub fn host_key(addr: [u8; 4]) -> Key<[u8; 4]> {
    Key::new(32, addr)
}
