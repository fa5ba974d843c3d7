//! Limits a hostile client meets without slowing anyone else (bounded stress tests that
//! assert their bound).

use std::time::{Duration, Instant};

use crate::common::*;

/// p99 of `n` sends by `sender`, each waiting for its `message_accepted`.
async fn accept_p99(a: &Instance, sender: &str, tag: &str, n: usize) -> Duration {
    let (mut c, _) = a.join(sender).await;
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        c.chat("bob", "c", "hi", Some(&format!("{tag}-{i}")))
            .await
            .expect("send");
        c.expect("message_accepted", T).await.expect("accepted");
        took.push(started.elapsed());
    }
    took.sort();
    took[(n * 99 / 100).min(n - 1)]
}

#[tokio::test]
async fn a_flood_of_one_repeated_client_msg_id_does_not_slow_other_senders() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("duplicate_flood");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let quiet = accept_p99(&a, "normal", "quiet", 200).await;

    // Sixteen flooders (every insert shard gets some), each repeating one clientMsgId at
    // 40/s, pipelined two at a time, under the rate limit.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flooders = Vec::new();
    for f in 0..16 {
        let (mut c, _) = a.join(&format!("flooder{f}")).await;
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut answered = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                for _ in 0..2 {
                    c.chat("bob", "c", "again", Some("the-same-id"))
                        .await
                        .expect("send");
                }
                for _ in 0..2 {
                    c.expect("message_accepted", T).await.expect("accepted");
                    answered += 1;
                }
            }
            answered
        }));
    }
    let flooded = accept_p99(&a, "normal", "flooded", 200).await;
    stop.cancel();
    let mut repeats = 0;
    for f in flooders {
        repeats += f.await.expect("flooder");
    }
    let stored = messages(&rs, &db)
        .await
        .count_documents(mongodb::bson::doc! {"clientMsgId": "the-same-id"})
        .await
        .expect("count");
    assert_eq!(
        stored, 16,
        "one document per flooder, however often it repeats"
    );
    assert!(repeats > 16 * 10, "the flood ran: {repeats} answers");
    // A floor for the quiet figure: a majority write on a busy 2-core machine.
    let bound = 2 * quiet.max(Duration::from_millis(5));
    assert!(
        flooded <= bound,
        "p99 accept latency beside the flood {flooded:?}, quiet {quiet:?} (bound {bound:?})"
    );
}
