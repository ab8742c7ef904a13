//! The HELP text of every metric Troupe records, given to the Prometheus
//! recorder when it is installed. A metric recorded without an entry here
//! shows up in `/metrics` without `# HELP`, which the gateway's metrics
//! test refuses: add it here when you add one.

/// Prometheus metric type, for the description call.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

use Kind::{Counter, Gauge, Histogram};

const METRICS: &[(&str, Kind, &str)] = &[
    (
        "gen_ai_client_operation_duration_seconds",
        Histogram,
        "GenAI operation duration (OpenTelemetry gen_ai.client.operation.duration): one model call, from the request to its last chunk.",
    ),
    (
        "gen_ai_client_operation_time_to_first_chunk_seconds",
        Histogram,
        "Time to the first streamed chunk of a model call (OpenTelemetry gen_ai.client.operation.time_to_first_chunk).",
    ),
    (
        "gen_ai_client_token_usage",
        Histogram,
        "Input and output tokens of one model call (OpenTelemetry gen_ai.client.token.usage), by gen_ai_token_type; source=server when the server counted them.",
    ),
    (
        "inference_latency_seconds",
        Histogram,
        "From asking for a GPU lease to the model's last chunk, per model.",
    ),
    (
        "troupe_actor_append_failures_total",
        Counter,
        "Journal appends of durable actors that failed.",
    ),
    (
        "troupe_actor_recovery_seconds",
        Histogram,
        "Time to recover a durable actor from its snapshot and events.",
    ),
    (
        "troupe_agent_restarts_total",
        Counter,
        "Agent actors restarted by their supervisor.",
    ),
    (
        "troupe_agent_turns_in_flight",
        Gauge,
        "Agent turns being answered now.",
    ),
    (
        "troupe_blob_bytes_written_total",
        Counter,
        "Blob bytes stored.",
    ),
    (
        "troupe_blobs_collected_total",
        Counter,
        "Unreferenced blobs deleted by the collector.",
    ),
    (
        "troupe_cluster_frames_received_total",
        Counter,
        "Frames received from other nodes' actors, by kind.",
    ),
    (
        "troupe_cluster_frames_sent_total",
        Counter,
        "Frames sent to other nodes' actors, by kind.",
    ),
    (
        "troupe_cluster_gpu_refusals_total",
        Counter,
        "GPU tasks refused by every node.",
    ),
    (
        "troupe_cluster_gpu_tasks_total",
        Counter,
        "GPU tasks admitted, by the node that ran them.",
    ),
    (
        "troupe_cluster_members",
        Gauge,
        "Live nodes this node sees, itself included.",
    ),
    (
        "troupe_cluster_pauses_total",
        Counter,
        "Times this node found itself paused past the failure detector and handed over what it held.",
    ),
    (
        "troupe_cluster_peers_disconnected_total",
        Counter,
        "Peers disconnected for not answering heartbeats.",
    ),
    (
        "troupe_cluster_tells_dropped_total",
        Counter,
        "Remote tells dropped on arrival (full mailbox, unknown agent, undecodable).",
    ),
    (
        "troupe_entities_active",
        Gauge,
        "Entities (sessions, tasks...) in memory, by kind.",
    ),
    (
        "troupe_entities_refused_total",
        Counter,
        "Entity activations refused at the table's bound.",
    ),
    (
        "troupe_entity_activations_total",
        Counter,
        "Entities activated from the journal, by kind.",
    ),
    (
        "troupe_entity_passivations_total",
        Counter,
        "Idle entities passivated, by kind.",
    ),
    (
        "troupe_gateway_accept_errors_total",
        Counter,
        "Connections the listener failed to accept (out of file descriptors, reset).",
    ),
    (
        "troupe_gateway_connections",
        Gauge,
        "HTTP connections open now.",
    ),
    (
        "troupe_gateway_connections_cut_total",
        Counter,
        "HTTP connections closed on an error, by reason (header_timeout, malformed, io: a write time-out included).",
    ),
    (
        "troupe_gateway_errors_total",
        Counter,
        "Error answers, by code.",
    ),
    (
        "troupe_gateway_gpu_utilization_percent",
        Gauge,
        "GPU utilization as the degrade policy sees it.",
    ),
    (
        "troupe_gateway_panics_total",
        Counter,
        "Handlers that panicked (answered 500).",
    ),
    (
        "troupe_gateway_refused_total",
        Counter,
        "Requests refused before any work, by reason.",
    ),
    (
        "troupe_gateway_streams",
        Gauge,
        "Session event streams open now.",
    ),
    (
        "troupe_gateway_tasks_accepted_total",
        Counter,
        "Tasks accepted (journaled).",
    ),
    (
        "troupe_gateway_tasks_total",
        Counter,
        "Tasks ended, by outcome.",
    ),
    (
        "troupe_gateway_tasks_unreadable_total",
        Counter,
        "Task records that could not be read at start-up (reported and skipped).",
    ),
    (
        "troupe_gateway_timeouts_total",
        Counter,
        "Requests past their time-out, by class of route.",
    ),
    (
        "troupe_gpu_batch_size",
        Histogram,
        "Lease requests and releases decided per drained batch of the GPU supervisor.",
    ),
    (
        "troupe_gpu_fenced_total",
        Counter,
        "Stale lease operations refused by generation fencing.",
    ),
    (
        "troupe_gpu_fields_refused_total",
        Counter,
        "NVML fields a device refused to report, by device and field.",
    ),
    (
        "troupe_gpu_journal_appends_total",
        Counter,
        "Appends to the lease journal.",
    ),
    (
        "troupe_gpu_leases_granted_total",
        Counter,
        "GPU leases granted.",
    ),
    (
        "troupe_gpu_memory_total_bytes",
        Gauge,
        "Memory of each GPU.",
    ),
    (
        "troupe_gpu_memory_used_bytes",
        Gauge,
        "Memory used on each GPU, as the device reports it.",
    ),
    (
        "troupe_gpu_notices_dropped_total",
        Counter,
        "Lease notices (preemption, device failure) a holder's full channel could not take.",
    ),
    (
        "troupe_gpu_pending_requests",
        Gauge,
        "Lease requests waiting, by priority.",
    ),
    ("troupe_gpu_power_watts", Gauge, "Power draw of each GPU."),
    (
        "troupe_gpu_preemptions_total",
        Counter,
        "Leases preempted for higher-priority work.",
    ),
    (
        "troupe_gpu_requests_refused_total",
        Counter,
        "Lease requests refused.",
    ),
    (
        "troupe_gpu_temperature_celsius",
        Gauge,
        "Temperature of each GPU.",
    ),
    (
        "troupe_gpu_utilization_percent",
        Gauge,
        "Each GPU's own utilization reading.",
    ),
    (
        "troupe_inference_refused_total",
        Counter,
        "Inferences refused before they started (lease refused), by model.",
    ),
    (
        "troupe_journal_archived_bytes_total",
        Counter,
        "Cold segment bytes written by the archiver.",
    ),
    (
        "troupe_journal_archived_events_total",
        Counter,
        "Events moved to the cold tier.",
    ),
    (
        "troupe_journal_batch_events",
        Histogram,
        "Events per journal group commit.",
    ),
    (
        "troupe_journal_cold_segment_reads_total",
        Counter,
        "Cold segments fetched and decoded.",
    ),
    (
        "troupe_journal_commit_failures_total",
        Counter,
        "Journal group commits that failed.",
    ),
    (
        "troupe_journal_commit_seconds",
        Histogram,
        "One journal group commit (write and sync).",
    ),
    (
        "troupe_journal_events_appended_total",
        Counter,
        "Events appended to the journal.",
    ),
    (
        "troupe_journal_hot_bytes",
        Gauge,
        "Bytes held by the hot tier.",
    ),
    (
        "troupe_journal_hot_hits_total",
        Counter,
        "Replays answered from the hot tail, by kind.",
    ),
    (
        "troupe_journal_hot_misses_total",
        Counter,
        "Replays that went past the hot tail, by kind.",
    ),
    (
        "troupe_lease_wait_seconds",
        Histogram,
        "Time to get (or be refused) a GPU lease.",
    ),
    (
        "troupe_mailbox_depth",
        Gauge,
        "Messages waiting in a mailbox, by actor.",
    ),
    (
        "troupe_mailbox_refused_total",
        Counter,
        "Tells refused by a full mailbox, by actor.",
    ),
    (
        "troupe_mcp_calls_total",
        Counter,
        "Calls sent to an MCP server's tools, by server and outcome (ok, failed).",
    ),
    (
        "troupe_mcp_restarts_total",
        Counter,
        "Connections to an MCP server that ended or failed to start, by server.",
    ),
    (
        "troupe_mcp_up",
        Gauge,
        "1 while the connection to an MCP server is up, by server.",
    ),
    (
        "troupe_answers_rejected_total",
        Counter,
        "Typed answers that did not fit their schema and were sent back to be repaired, by backend.",
    ),
    (
        "troupe_tool_approvals_total",
        Counter,
        "Decisions on tool calls that needed approval, as the waiting turns saw them, by tool and outcome (approved, rejected, timed_out).",
    ),
    (
        "troupe_tool_approvals_waiting",
        Gauge,
        "Turns waiting for a decision on a tool call (holding no GPU lease and no turn slot).",
    ),
    (
        "troupe_model_retries_total",
        Counter,
        "Retries of a model server's 429 or 5xx answers, by backend.",
    ),
    (
        "troupe_saga_compensations_total",
        Counter,
        "Compensations run.",
    ),
    (
        "troupe_saga_step_seconds",
        Histogram,
        "One saga step attempt.",
    ),
    (
        "troupe_sagas_aborted_total",
        Counter,
        "Sagas aborted (compensated).",
    ),
    ("troupe_sagas_completed_total", Counter, "Sagas completed."),
    (
        "troupe_sagas_parked_total",
        Counter,
        "Sagas parked for attention (a compensation kept failing).",
    ),
    ("troupe_sagas_started_total", Counter, "Sagas started."),
    (
        "troupe_session_subscribers",
        Gauge,
        "Live subscriptions to session events.",
    ),
    (
        "troupe_supervisor_restarts_total",
        Counter,
        "Children restarted by a supervisor, by child.",
    ),
    (
        "troupe_timers_dropped_total",
        Counter,
        "Durable timers dropped (their target refused them for good).",
    ),
    (
        "troupe_timers_pending",
        Gauge,
        "Durable timers scheduled and not yet fired.",
    ),
    (
        "troupe_topic_dropped_total",
        Counter,
        "Topic messages a full subscriber missed, by topic.",
    ),
];

/// Gives the recorder every metric's HELP text.
pub(crate) fn describe() {
    for &(name, kind, help) in METRICS {
        match kind {
            Counter => metrics::describe_counter!(name, help),
            Gauge => metrics::describe_gauge!(name, help),
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
}
