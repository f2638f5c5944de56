//! The wire decoders fuzzed: arbitrary bytes, arbitrary frame streams and
//! valid messages mutated (bytes flipped, truncated, extended) go through
//! every decoder. None may panic or allocate by an unchecked length; every
//! rejection is a typed error. Valid messages round-trip.
//!
//! Case counts: `PAGEWIRE_FUZZ_CASES` (default 4,000,000 spread over the
//! properties below, about 5 s: the decoders and proptest are built optimised).

use std::io::Cursor;

use pagewire_transport::wire::{self, *};
use pagewire_transport::{
    MemoryLayout, PageRange, RegionInfo, SourceInfo, TransportError, ZeroMap,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn total_cases() -> u32 {
    std::env::var("PAGEWIRE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000_000)
}

fn runner(share: f64) -> TestRunner {
    TestRunner::new(Config {
        cases: ((f64::from(total_cases()) * share) as u32).max(1),
        failure_persistence: None,
        ..Config::default()
    })
}

const TYPES: [u8; 16] = [
    T_DONE,
    T_AUTH,
    T_CHALLENGE,
    T_HELLO,
    T_FETCH,
    T_CHECKSUMS,
    T_STATS,
    T_RDMA_CONNECT,
    T_WELCOME,
    T_PAGES,
    T_CHECKSUM_LIST,
    T_STATS_REPLY,
    T_ERROR,
    T_RDMA_ACCEPT,
    T_DIRTY,
    T_DIRTY_MAP,
];

/// Feeds `body` (of a frame of type `ty`) to every decoder that could see
/// it. Only typed errors may come out.
fn decode_all(ty: u8, body: &[u8]) {
    let _: Result<_, TransportError> = decode_request(ty, body);
    let _ = decode_hello(body);
    let _ = decode_welcome(body);
    let _ = decode_rdma_accept(body);
    let _ = decode_checksums(body);
    let _ = decode_stats(body);
    let _ = decode_challenge(body);
    let _ = decode_auth(body);
    let _ = decode_dirty_map(body, 1000);
    let _ = decode_dirty_map(body, u64::MAX);
}

/// Reads frames from a byte stream until it ends or a frame is refused,
/// decoding each.
fn decode_stream(bytes: &[u8]) {
    let mut r = Cursor::new(bytes);
    while let Ok((ty, body)) = read_frame(&mut r, 1 << 16) {
        decode_all(ty, &body);
    }
}

fn valid_messages() -> impl Strategy<Value = Vec<u8>> {
    let range = (0u64..1 << 40, 1u32..5000).prop_map(|(f, c)| PageRange::new(f, c));
    let ep = (
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        1u8..=5,
        1u8..=16,
    )
        .prop_map(|(qpn, psn, gid, lid, mtu, rd_atomic)| QpEndpoint {
            qpn,
            psn,
            gid,
            lid,
            mtu,
            rd_atomic,
        });
    prop_oneof![
        (any::<u64>(), prop::collection::vec(range.clone(), 0..40))
            .prop_map(|(id, ranges)| encode_request(&Request::Fetch { id, ranges })),
        (any::<u64>(), range)
            .prop_map(|(id, range)| encode_request(&Request::Checksums { id, range })),
        any::<u64>().prop_map(|id| encode_request(&Request::Stats { id })),
        any::<u64>().prop_map(|id| encode_request(&Request::Done { id })),
        (any::<u64>(), ep.clone())
            .prop_map(|(id, ep)| encode_request(&Request::RdmaConnect { id, ep })),
        (
            any::<u64>(),
            ep,
            prop::collection::vec((any::<u64>(), any::<u64>(), any::<u32>()), 1..8)
        )
            .prop_map(|(id, ep, r)| {
                let regions = r
                    .into_iter()
                    .map(|(addr, len, rkey)| RemoteRegion { addr, len, rkey })
                    .collect();
                encode_rdma_accept(id, &RdmaAccept { ep, regions })
            }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(id, s)| encode_checksums(id, &s)),
        (1u64..64, prop::collection::vec(any::<bool>(), 64)).prop_map(|(pages, z)| {
            let layout = MemoryLayout::new(
                4096,
                vec![RegionInfo {
                    guest_base: 0,
                    len: pages * 4096,
                }],
            )
            .unwrap();
            let mut zero = ZeroMap::new(pages);
            for (p, is) in z.iter().enumerate().take(pages as usize) {
                if *is {
                    zero.set(p as u64);
                }
            }
            encode_welcome(&Welcome {
                version: VERSION,
                session: pages,
                info: Some(SourceInfo { layout, zero }),
            })
        }),
        (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(n, p)| encode_challenge(&n, &p)),
        any::<[u8; 32]>().prop_map(|p| encode_auth(&p)),
        (any::<u16>(), 0u16..4).prop_map(|(lane, k)| {
            let kind = match k {
                0 => ChannelKind::Control,
                1 => ChannelKind::Urgent,
                _ => ChannelKind::Bulk(lane),
            };
            encode_hello(&Hello {
                version: VERSION,
                kind,
                nonce: [lane as u8; 32],
            })
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    SetLen(u32),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(u32::MAX),
                Just(MAX_FRAME + 1),
                any::<u32>()
            ]
            .prop_map(Mutation::SetLen),
        ],
        1..4,
    )
}

#[test]
fn arbitrary_bodies_of_every_type_are_refused_cleanly() {
    runner(0.45)
        .run(
            &(
                prop::sample::select(&TYPES[..]),
                prop::collection::vec(any::<u8>(), 0..96),
            ),
            |(ty, body)| {
                decode_all(ty, &body);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn arbitrary_frame_streams_are_read_and_refused_cleanly() {
    runner(0.2)
        .run(&prop::collection::vec(any::<u8>(), 0..256), |bytes| {
            decode_stream(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_valid_messages_are_refused_cleanly() {
    runner(0.3)
        .run(&(valid_messages(), mutations()), |(mut f, muts)| {
            for m in muts {
                match m {
                    Mutation::Flip(i, b) if !f.is_empty() => {
                        let n = f.len();
                        f[i % n] ^= b | 1;
                    }
                    Mutation::Truncate(i) => f.truncate(i % (f.len() + 1)),
                    Mutation::Extend(more) => f.extend(more),
                    Mutation::SetLen(len) if f.len() >= 4 => {
                        f[..4].copy_from_slice(&len.to_le_bytes())
                    }
                    _ => {}
                }
            }
            decode_stream(&f);
            if f.len() > 5 {
                decode_all(f[4], &f[5..]);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn valid_messages_round_trip() {
    runner(0.05)
        .run(&valid_messages(), |f| {
            let mut r = Cursor::new(&f[..]);
            let (ty, body) = read_frame(&mut r, MAX_FRAME as usize).expect("a valid frame");
            prop_assert_eq!(r.position() as usize, f.len());
            let ok = match ty {
                T_HELLO => decode_hello(&body).map(|h| encode_hello(&h) == f),
                T_WELCOME => decode_welcome(&body).map(|w| encode_welcome(&w) == f),
                T_RDMA_ACCEPT => {
                    decode_rdma_accept(&body).map(|(id, a)| encode_rdma_accept(id, &a) == f)
                }
                T_CHECKSUM_LIST => {
                    decode_checksums(&body).map(|(id, s)| encode_checksums(id, &s) == f)
                }
                t => match decode_request(t, &body) {
                    Ok(req) => Ok(encode_request(&req) == f),
                    // Requests past the wire's limits are refused, typed.
                    Err(TransportError::TooLarge { .. }) | Err(TransportError::Protocol(_)) => {
                        Ok(true)
                    }
                    Err(e) => Err(e),
                },
            };
            prop_assert!(ok.unwrap_or(false), "type {:#04x} did not round-trip", ty);
            Ok(())
        })
        .unwrap();
}

#[test]
fn frame_lengths_past_the_limit_are_refused_before_allocating() {
    // A frame claiming 80 MiB + 1 must be refused from its header alone.
    let mut f = (MAX_FRAME + 1).to_le_bytes().to_vec();
    f.push(T_PAGES);
    assert!(read_frame(&mut Cursor::new(&f[..]), usize::MAX).is_err());
    let _ = wire::MAGIC;
}
