package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/internal/metrics"
	"github.com/billingd/billingd/jobs"
)

// MaxWebhookBody is the largest webhook body read. Stripe's event payloads are far smaller; a
// larger body is refused with 413 before it is parsed.
const MaxWebhookBody = 1 << 20

// WebhookTolerance is how old a signature's timestamp may be: Stripe's own default, 300 s.
const WebhookTolerance = webhook.DefaultTolerance

// insertEventQuery stores an event once by its id. A redelivery inserts nothing and returns no row,
// so that no second ingest_event job is inserted.
const insertEventQuery = `
insert into billing.webhook_events (id, type, api_version, livemode, created, payload, api_version_mismatch, object_id)
values ($1, $2, nullif($3, ''), $4, to_timestamp($5), $6, $7, nullif($8, ''))
on conflict (id) do nothing
returning id`

// Webhooks receives Stripe's signed events at POST /webhooks/stripe. It verifies the signature
// (stripe-go, the endpoint's whsec_ secret, 300 s tolerance), stores the event once by its id and
// inserts its ingest_event job in the same transaction, then answers 200; the job does the work.
//
// A bad or missing signature, a stale timestamp, a body over 1 MiB, or a body that is not a Stripe
// event gets a 4xx and stores nothing. A database failure gets a 500, so that Stripe delivers the
// event again. Events of another API version family than stripe-go's are accepted, stored with
// api_version_mismatch set, logged and counted: never dropped silently (see the README).
type Webhooks struct {
	pool   *pgxpool.Pool
	river  *river.Client[pgx.Tx]
	secret string
	logger *slog.Logger
}

// NewWebhooks returns the webhook handler. client inserts the ingest_event jobs; it need not be
// started.
func NewWebhooks(pool *pgxpool.Pool, client *river.Client[pgx.Tx], secret string, logger *slog.Logger) *Webhooks {
	return &Webhooks{pool: pool, river: client, secret: secret, logger: logger}
}

// errBadEvent marks a verified body that is not a usable Stripe event.
var errBadEvent = errors.New("not a Stripe event")

// ServeHTTP handles one delivery.
func (h *Webhooks) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxWebhookBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			h.reject(w, http.StatusRequestEntityTooLarge, "body_too_large", "body larger than 1 MiB")
			return
		}
		h.reject(w, http.StatusBadRequest, "unreadable_body", "cannot read body")
		return
	}
	event, err := webhook.ConstructEventWithOptions(body, r.Header.Get("Stripe-Signature"), h.secret,
		webhook.ConstructEventOptions{Tolerance: WebhookTolerance, IgnoreAPIVersionMismatch: true})
	if err == nil {
		err = checkEvent(&event)
	}
	if err != nil {
		reason, msg := rejectReason(err)
		h.reject(w, http.StatusBadRequest, reason, msg)
		return
	}

	mismatch := !compatibleAPIVersion(event.APIVersion)
	objectID, _ := event.Data.Object["id"].(string)
	stored, err := h.store(r.Context(), &event, body, mismatch, objectID)
	if err != nil {
		metrics.WebhookEvents.WithLabelValues("error").Inc()
		h.logger.Error("store webhook event", "event_id", event.ID, "event_type", string(event.Type), "error", err)
		http.Error(w, "cannot store the event; deliver it again", http.StatusInternalServerError)
		return
	}
	if !stored {
		metrics.WebhookEvents.WithLabelValues("duplicate").Inc()
		h.logger.Debug("webhook event already stored", "event_id", event.ID, "event_type", string(event.Type))
	} else {
		metrics.WebhookEvents.WithLabelValues("stored").Inc()
		h.logger.Info("webhook event stored", "event_id", event.ID, "event_type", string(event.Type), "object_id", objectID)
		if mismatch {
			metrics.WebhookEvents.WithLabelValues("api_version_mismatch").Inc()
			h.logger.Warn("webhook event of another API version; stored and flagged",
				"event_id", event.ID, "event_api_version", event.APIVersion, "expected_api_version", stripe.APIVersion)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"received":true}` + "\n"))
}

// store inserts the event and its ingest_event job in one transaction. It returns false when the
// event was stored before (a redelivery): then nothing is written.
func (h *Webhooks) store(ctx context.Context, e *stripe.Event, body []byte, mismatch bool, objectID string) (bool, error) {
	// The delivery must not be half-stored because Stripe hung up: finish the short write.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	stored := false
	err := pgx.BeginFunc(ctx, h.pool, func(tx pgx.Tx) error {
		var id string
		err := tx.QueryRow(ctx, insertEventQuery, e.ID, string(e.Type), e.APIVersion, e.Livemode, e.Created,
			json.RawMessage(body), mismatch, objectID).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("insert event %s: %w", e.ID, err)
		}
		if _, err := h.river.InsertTx(ctx, tx, jobs.IngestEventArgs{EventID: e.ID}, nil); err != nil {
			return fmt.Errorf("insert ingest_event job for %s: %w", e.ID, err)
		}
		stored = true
		return nil
	})
	return stored, err
}

func (h *Webhooks) reject(w http.ResponseWriter, status int, reason, msg string) {
	metrics.WebhookEvents.WithLabelValues("rejected").Inc()
	h.logger.Warn("webhook delivery rejected", "reason", reason, "http_status", status)
	http.Error(w, msg, status)
}

// checkEvent refuses a verified body that lacks what billingd needs of an event.
func checkEvent(e *stripe.Event) error {
	switch {
	case !strings.HasPrefix(e.ID, "evt_"):
		return fmt.Errorf("%w: id %q", errBadEvent, e.ID)
	case strings.TrimSpace(string(e.Type)) == "":
		return fmt.Errorf("%w: no type", errBadEvent)
	case e.Created <= 0:
		return fmt.Errorf("%w: no created time", errBadEvent)
	case e.Data == nil || e.Data.Object == nil:
		return fmt.Errorf("%w: no data.object", errBadEvent)
	}
	return nil
}

// rejectReason names a verification failure for the log and the answer, without echoing input.
func rejectReason(err error) (reason, msg string) {
	switch {
	case errors.Is(err, webhook.ErrNotSigned):
		return "not_signed", "missing Stripe-Signature header"
	case errors.Is(err, webhook.ErrInvalidHeader):
		return "invalid_signature_header", "malformed Stripe-Signature header"
	case errors.Is(err, webhook.ErrNoValidSignature):
		return "bad_signature", "no valid signature"
	case errors.Is(err, webhook.ErrTooOld):
		return "stale_timestamp", "signature timestamp outside the tolerance"
	case errors.Is(err, errBadEvent):
		return "not_an_event", "body is not a Stripe event"
	default:
		return "malformed_body", "body is not valid JSON"
	}
}

// compatibleAPIVersion applies stripe-go's rule (webhook.isCompatibleAPIVersion): an event is of
// the SDK's version when it belongs to the same release train ("basil"). Events from before
// release trains, or of another train, are mismatches.
func compatibleAPIVersion(v string) bool {
	_, train, ok := strings.Cut(v, ".")
	return ok && train == stripe.APIMajorVersion
}
