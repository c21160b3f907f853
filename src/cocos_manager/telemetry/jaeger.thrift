# The jaeger.thrift wire format spoken by Jaeger's collector at POST /api/traces
# (Content-Type: application/x-thrift, binary protocol, body = one Batch).
#
# Written for cocos-manager after jaegertracing/jaeger-idl thrift/jaeger.thrift (Apache-2.0);
# field ids and types must stay exactly as there, they are the wire format.

namespace py jaeger

# TagType denotes the type of a Tag's value.
enum TagType { STRING, DOUBLE, BOOL, LONG, BINARY }

# Tag is a basic strongly typed key/value pair, flattened to one struct.
struct Tag {
  1: required string  key
  2: required TagType vType
  3: optional string  vStr
  4: optional double  vDouble
  5: optional bool    vBool
  6: optional i64     vLong
  7: optional binary  vBinary
}

# Log is a timed event with an arbitrary set of tags.
struct Log {
  1: required i64       timestamp  # microseconds since the epoch
  2: required list<Tag> fields
}

enum SpanRefType { CHILD_OF, FOLLOWS_FROM }

# SpanRef describes the causal relationship of the current span to another span.
struct SpanRef {
  1: required SpanRefType refType
  2: required i64         traceIdLow
  3: required i64         traceIdHigh
  4: required i64         spanId
}

# Span represents a named unit of work performed by a service.
struct Span {
  1:  required i64           traceIdLow    # least significant 64 bits of the trace id
  2:  required i64           traceIdHigh   # most significant 64 bits; 0 for 64-bit ids
  3:  required i64           spanId
  4:  required i64           parentSpanId  # 0 for a root span
  5:  required string        operationName
  6:  optional list<SpanRef> references
  7:  required i32           flags         # 1 = sampled, 2 = debug
  8:  required i64           startTime     # microseconds since the epoch
  9:  required i64           duration      # microseconds
  10: optional list<Tag>     tags
  11: optional list<Log>     logs
}

# Process describes the traced process/service that emits spans.
struct Process {
  1: required string    serviceName
  2: optional list<Tag> tags
}

# ClientStats are self-reported client metrics.
struct ClientStats {
  1: required i64 fullQueueDroppedSpans
  2: required i64 tooLargeDroppedSpans
  3: required i64 failedToEmitSpans
}

# Batch is a collection of spans reported out of process.
struct Batch {
  1: required Process     process
  2: required list<Span>  spans
  3: optional i64         seqNo
  4: optional ClientStats stats
}

# BatchSubmitResponse is the response on submitting a batch.
struct BatchSubmitResponse {
  1: required bool ok  # true upon successful submission
}

service Collector {
  list<BatchSubmitResponse> submitBatches(1: list<Batch> batches)
}
