// Package metrics holds billingd's Prometheus collectors, registered on one registry that the
// daemon serves at /metrics. Labels are low-cardinality (outcomes, operations, codes), never ids
// or secrets.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Registry is the registry served at /metrics.
var Registry = prometheus.NewRegistry()

var (
	// ChargeOutcomes counts charge attempts by outcome: succeeded, declined, retry_scheduled,
	// recovering, transient, unknown, skipped.
	ChargeOutcomes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "charge_outcomes_total",
		Help: "Charge attempts by outcome.",
	}, []string{"outcome"})

	// Declines counts declines by Stripe decline code (or error code when there is none).
	Declines = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "declines_total",
		Help: "Declined charges by decline code.",
	}, []string{"code"})

	// StripeRequests measures calls to Stripe by operation and HTTP status class.
	StripeRequests = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "billingd", Name: "stripe_request_duration_seconds",
		Help:    "Latency of calls to Stripe by operation and status.",
		Buckets: []float64{.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"operation", "status"})

	// Recoveries counts recovery events: opened, notified, recovered, uncollectible, refunded.
	Recoveries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "recoveries_total",
		Help: "Recovery flow events.",
	}, []string{"event"})

	// DueCharges counts charges created by the due computation, by source.
	DueCharges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "due_charges_created_total",
		Help: "Charges created by the due computation, by source.",
	}, []string{"source"})

	// WebhookEvents counts Stripe events, by result. Deliveries: stored, duplicate, rejected (4xx),
	// error (5xx), api_version_mismatch (stored, but of another API version family). Ingestion:
	// processed, ignored, unknown_object (about an object billingd does not know: look), failed.
	WebhookEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "webhook_events_total",
		Help: "Stripe webhook deliveries by result.",
	}, []string{"result"})

	// Notifications counts notification deliveries by channel and result.
	Notifications = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "billingd", Name: "notifications_total",
		Help: "Customer notifications by channel and result.",
	}, []string{"channel", "result"})
)

func init() {
	Registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		ChargeOutcomes, Declines, StripeRequests, Recoveries, DueCharges, WebhookEvents, Notifications,
	)
}
