package jobs

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
	"github.com/billingd/billingd/internal/stripeapi"
)

// IngestEventArgs asks for one stored Stripe event (billing.webhook_events) to be applied. The
// webhook handler inserts it in the transaction that stores the event, once per event id.
type IngestEventArgs struct {
	EventID string `json:"event_id"`
}

// Kind is the job kind.
func (IngestEventArgs) Kind() string { return "ingest_event" }

// InsertOpts puts event ingestion on the webhooks queue.
func (IngestEventArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueWebhooks, MaxAttempts: 25}
}

// Outcomes of an event, in billing.webhook_events.status.
const (
	eventProcessed     = "processed"      // applied, or found already applied
	eventIgnored       = "ignored"        // a type, or an object, that billingd does not act on
	eventUnknownObject = "unknown_object" // about an object billingd does not know: reported, not retried
	eventFailed        = "failed"         // cannot be applied (Stripe refused a lookup, the data conflict)
)

// IngestEventWorker applies a stored Stripe event:
//
//   - checkout.session.completed, mode setup: the SetupIntent's payment method is attached to the
//     customer (when the session had no customer), stored, covered by a consent that copies the
//     terms shown, and made the default; mode payment with metadata charge_id: RecoveryPaidTx.
//   - payment_intent.succeeded and payment_intent.payment_failed: SettlePaymentIntentTx.
//   - payment_method.detached: the method is marked detached and stops being the default (the
//     customer's future charges then go to recovery, which collects a new method).
//   - payment_method.automatically_updated: the new card details, unless newer ones are held.
//   - checkout.session.expired: the setup or recovery session is marked expired.
//   - any other type: recorded as ignored.
//
// An event whose object carries metadata billingd_installation of another installation (one
// that shares the Stripe account) is recorded as ignored, whatever its type: its ids name that
// installation's rows. Objects without the key are handled as before.
//
// Every effect is guarded by state (an event row is applied once, under a row lock; a completed
// session is not completed again) and by the objects' own times (card details carry the event
// time they came from), so duplicate and out-of-order deliveries change nothing twice. An event
// about an object billingd does not know is recorded as unknown_object, logged and counted, and
// not retried. Transient failures (Stripe unreachable, 5xx, 429, the database) are River retries.
type IngestEventWorker struct {
	river.WorkerDefaults[IngestEventArgs]
	deps *Deps
}

// outcome is what applying an event came to.
type outcome struct {
	status string
	note   string
}

// Work applies the event named by the job.
func (w *IngestEventWorker) Work(ctx context.Context, job *river.Job[IngestEventArgs]) error {
	id := job.Args.EventID
	var (
		payload []byte
		status  string
	)
	err := w.deps.Pool.QueryRow(ctx, `select payload, status from billing.webhook_events where id = $1`, id).Scan(&payload, &status)
	if errors.Is(err, pgx.ErrNoRows) {
		return river.JobCancel(fmt.Errorf("event %s is not stored", id))
	}
	if err != nil {
		return fmt.Errorf("load event %s: %w", id, err)
	}
	if status != "received" {
		return nil // applied before: a job run twice
	}
	var e stripe.Event
	if err := json.Unmarshal(payload, &e); err != nil || e.Data == nil {
		return w.finish(ctx, job, &e, outcome{eventFailed, "stored payload is not an event"})
	}
	if other, err := w.otherInstallation(ctx, &e); err != nil {
		return err
	} else if other != "" {
		w.deps.Logger.Info("webhook event about another billingd installation's object; ignored",
			"event_id", e.ID, "event_type", string(e.Type), "object_installation", other)
		return w.finish(ctx, job, &e, outcome{eventIgnored, "object of billingd installation " + other + ", not this one: not billingd's"})
	}

	switch e.Type {
	case stripe.EventTypeCheckoutSessionCompleted:
		return w.sessionCompleted(ctx, job, &e)
	case stripe.EventTypeCheckoutSessionExpired:
		return w.sessionExpired(ctx, job, &e)
	case stripe.EventTypePaymentIntentSucceeded, stripe.EventTypePaymentIntentPaymentFailed:
		return w.paymentIntentOutcome(ctx, job, &e)
	case stripe.EventTypePaymentMethodDetached:
		return w.paymentMethodDetached(ctx, job, &e)
	case stripe.EventTypePaymentMethodAutomaticallyUpdated:
		return w.paymentMethodUpdated(ctx, job, &e)
	default:
		return w.finish(ctx, job, &e, outcome{eventIgnored, "event type not handled by billingd"})
	}
}

// otherInstallation returns the installation named by the event's object (its metadata
// billingd_installation) when that is not this one: another installation that shares the Stripe
// account created it, and its charge_id or setup_session_id name that installation's rows, not
// this one's. An object without the key (made before objects carried it, or not by billingd) is
// handled as before, by its type and other metadata: "" is returned for it.
func (w *IngestEventWorker) otherInstallation(ctx context.Context, e *stripe.Event) (string, error) {
	md, _ := e.Data.Object["metadata"].(map[string]any)
	v, ok := md[stripeapi.MetadataInstallation]
	if !ok {
		return "", nil
	}
	named, _ := v.(string)
	installation, err := w.deps.Installation(ctx)
	if err != nil {
		return "", fmt.Errorf("ingest event %s: %w", e.ID, err)
	}
	if named == installation {
		return "", nil
	}
	return cmp.Or(named, "(empty)"), nil
}

// finish records an outcome that needs no other write.
func (w *IngestEventWorker) finish(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event, o outcome) error {
	return w.apply(ctx, job, e, func(pgx.Tx) (outcome, error) { return o, nil })
}

// apply runs fn and records its outcome on the event in one transaction, with the event row
// locked, and completes the job in that transaction. When the event was applied meanwhile (a
// concurrent run of the same job), fn does not run. An error from fn rolls everything back and
// is returned for River to retry.
func (w *IngestEventWorker) apply(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event, fn func(pgx.Tx) (outcome, error)) error {
	var o outcome
	applied := false
	err := pgx.BeginFunc(ctx, w.deps.Pool, func(tx pgx.Tx) error {
		var status string
		if err := tx.QueryRow(ctx, `select status from billing.webhook_events where id = $1 for update`, job.Args.EventID).Scan(&status); err != nil {
			return fmt.Errorf("lock event %s: %w", job.Args.EventID, err)
		}
		if status != "received" {
			return nil
		}
		var err error
		if o, err = fn(tx); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `update billing.webhook_events set status = $2, note = nullif($3, ''), processed_at = now() where id = $1`,
			job.Args.EventID, o.status, o.note); err != nil {
			return fmt.Errorf("record outcome of event %s: %w", job.Args.EventID, err)
		}
		if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
			return fmt.Errorf("complete ingest_event job: %w", err)
		}
		applied = true
		return nil
	})
	if err != nil {
		return fmt.Errorf("ingest event %s (%s): %w", job.Args.EventID, e.Type, err)
	}
	if applied {
		w.report(e, o)
	}
	return nil
}

// report logs and counts an outcome. An unknown object or a failure is a warning: someone should
// look (a webhook endpoint shared with another system, or data changed by hand).
func (w *IngestEventWorker) report(e *stripe.Event, o outcome) {
	metrics.WebhookEvents.WithLabelValues(o.status).Inc()
	var objectID string
	if e.Data != nil {
		objectID, _ = e.Data.Object["id"].(string)
	}
	attrs := []any{"event_id", e.ID, "event_type", string(e.Type), "object_id", objectID, "outcome", o.status, "note", o.note}
	switch o.status {
	case eventUnknownObject:
		w.deps.Logger.Warn("webhook event about an unknown object", attrs...)
	case eventFailed:
		w.deps.Logger.Error("webhook event cannot be applied", attrs...)
	default:
		w.deps.Logger.Info("webhook event ingested", attrs...)
	}
}

// clientFrom returns the River client that runs the job, or nil when ctx carries none.
func clientFrom(ctx context.Context) *river.Client[pgx.Tx] {
	c, err := river.ClientFromContextSafely[pgx.Tx](ctx)
	if err != nil {
		return nil
	}
	return c
}

// --- checkout.session.completed ---

func (w *IngestEventWorker) sessionCompleted(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event) error {
	var cs stripe.CheckoutSession
	if err := json.Unmarshal(e.Data.Raw, &cs); err != nil {
		return w.finish(ctx, job, e, outcome{eventFailed, "data.object is not a Checkout Session"})
	}
	switch cs.Mode {
	case stripe.CheckoutSessionModeSetup:
		return w.setupCompleted(ctx, job, e, &cs)
	case stripe.CheckoutSessionModePayment:
		if cs.Metadata["charge_id"] == "" {
			return w.finish(ctx, job, e, outcome{eventIgnored, "payment session without metadata charge_id: not billingd's"})
		}
		return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
			known, err := RecoveryPaidTx(ctx, tx, clientFrom(ctx), &cs)
			if err != nil {
				return outcome{}, fmt.Errorf("recovery paid by session %s: %w", cs.ID, err)
			}
			if !known {
				return outcome{eventUnknownObject, "no recovery known for charge_id " + cs.Metadata["charge_id"]}, nil
			}
			return outcome{eventProcessed, "recovery paid"}, nil
		})
	default:
		return w.finish(ctx, job, e, outcome{eventIgnored, "checkout session mode " + string(cs.Mode) + " not used by billingd"})
	}
}

// setupRow is a setup session with what completing it needs.
type setupRow struct {
	id, customerID    int64
	status            string
	checkoutSessionID *string
	stripeCustomerID  *string
	stripeAccountID   *string
}

// findSetupSessionQuery finds the setup session of a Checkout Session: by its id, or, when the
// session's id was never stored, by the setup_session_id that its metadata carries.
const findSetupSessionQuery = `
select s.id, s.customer_id, s.status, s.checkout_session_id, c.stripe_customer_id, c.stripe_account_id
from billing.setup_sessions s join billing.customers c on c.id = s.customer_id
where s.checkout_session_id = $1 or (s.checkout_session_id is null and s.id = $2)
order by s.checkout_session_id is null
limit 1`

func findSetupSession(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, cs *stripe.CheckoutSession, lock bool) (*setupRow, error) {
	metaID, _ := strconv.ParseInt(cs.Metadata["setup_session_id"], 10, 64)
	query := findSetupSessionQuery
	if lock {
		query += " for update of s"
	}
	var s setupRow
	err := q.QueryRow(ctx, query, cs.ID, metaID).Scan(&s.id, &s.customerID, &s.status, &s.checkoutSessionID, &s.stripeCustomerID, &s.stripeAccountID)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find setup session of %s: %w", cs.ID, err)
	}
	return &s, nil
}

// savedMethod is the payment method a completed setup saved, as Stripe has it now.
type savedMethod struct {
	pm        *stripe.PaymentMethod
	attached  bool // attached to our customer; false when it was detached since
	retrieved time.Time
}

// Statements that apply a completed setup.
const (
	upsertPaymentMethodQuery = `
insert into billing.payment_methods as p
    (customer_id, stripe_payment_method_id, type, brand, last4, exp_month, exp_year, fingerprint, status, detached_at, card_updated_at)
values ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6::int, 0), nullif($7::int, 0), nullif($8, ''),
        $9, case when $9 = 'detached' then $10::timestamptz end, $10)
on conflict (stripe_payment_method_id) do update
    set brand = excluded.brand, last4 = excluded.last4, exp_month = excluded.exp_month, exp_year = excluded.exp_year,
        fingerprint = excluded.fingerprint, card_updated_at = excluded.card_updated_at
    where p.customer_id = excluded.customer_id
      and (p.card_updated_at is null or p.card_updated_at < excluded.card_updated_at)
returning id`

	// The consent copies the terms of the session's version: what the customer was shown.
	insertConsentQuery = `
insert into billing.consents (customer_id, payment_method_id, usage, terms_version, agreement, timing, amount_basis,
                              cancellation_policy, checkout_session_id, setup_intent_id, setup_session_id, accepted_at)
select s.customer_id, $2, s.usage, s.terms_version, t.agreement, t.timing, t.amount_basis, t.cancellation_policy,
       $3, nullif($4, ''), s.id, $5
from billing.setup_sessions s join billing.terms t on t.version = s.terms_version
where s.id = $1
on conflict do nothing`

	// The method becomes the default unless a setup completed later at Stripe already set one.
	setDefaultQuery = `
update billing.customers c set default_payment_method_id = $2, updated_at = now()
where c.id = $1 and c.default_payment_method_id is distinct from $2
  and exists (select 1 from billing.payment_methods p where p.id = $2 and p.status = 'attached')
  and not exists (select 1 from billing.setup_sessions s
                  where s.customer_id = c.id and s.id <> $3 and s.status = 'completed' and s.completed_at > $4)`

	completeSetupQuery = `
update billing.setup_sessions
set status = 'completed', completed_at = $2,
    checkout_session_id = coalesce(checkout_session_id, $3), url = coalesce(url, $4)
where id = $1 and status <> 'completed'`
)

func (w *IngestEventWorker) setupCompleted(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event, cs *stripe.CheckoutSession) error {
	s, err := findSetupSession(ctx, w.deps.Pool, cs, false)
	if err != nil {
		return err
	}
	if s == nil {
		return w.finish(ctx, job, e, outcome{eventUnknownObject, "no setup session for " + cs.ID})
	}
	if s.status == "completed" {
		return w.finish(ctx, job, e, outcome{eventProcessed, "setup session already completed"})
	}
	saved, o, err := w.retrieveSavedMethod(ctx, s, cs, e.Data.Raw)
	if o != nil {
		return w.finish(ctx, job, e, *o)
	}
	if err != nil {
		return err
	}
	completedAt := time.Unix(e.Created, 0).UTC()

	return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
		s, err := findSetupSession(ctx, tx, cs, true)
		if err != nil {
			return outcome{}, err
		}
		if s == nil {
			return outcome{eventUnknownObject, "no setup session for " + cs.ID}, nil
		}
		if s.status == "completed" {
			return outcome{eventProcessed, "setup session already completed"}, nil
		}
		pm := saved.pm
		status := "attached"
		if !saved.attached {
			status = "detached"
		}
		var card stripe.PaymentMethodCard
		if pm.Card != nil {
			card = *pm.Card
		}
		var pmID int64
		err = tx.QueryRow(ctx, upsertPaymentMethodQuery, s.customerID, pm.ID, string(pm.Type), string(card.Brand), card.Last4,
			card.ExpMonth, card.ExpYear, card.Fingerprint, status, saved.retrieved).Scan(&pmID)
		if errors.Is(err, pgx.ErrNoRows) {
			// Held already: newer details, or another customer's method.
			var owner int64
			if err := tx.QueryRow(ctx, `select id, customer_id from billing.payment_methods where stripe_payment_method_id = $1`, pm.ID).Scan(&pmID, &owner); err != nil {
				return outcome{}, fmt.Errorf("read payment method %s: %w", pm.ID, err)
			}
			if owner != s.customerID {
				return outcome{eventFailed, "payment method " + pm.ID + " is held for another customer"}, nil
			}
		} else if err != nil {
			return outcome{}, fmt.Errorf("store payment method %s: %w", pm.ID, err)
		}

		note := "payment method " + pm.ID + " saved"
		if cs.Consent != nil && cs.Consent.TermsOfService == stripe.CheckoutSessionConsentTermsOfServiceAccepted {
			setupIntentID := ""
			if cs.SetupIntent != nil {
				setupIntentID = cs.SetupIntent.ID
			}
			if _, err := tx.Exec(ctx, insertConsentQuery, s.id, pmID, cs.ID, setupIntentID, completedAt); err != nil {
				return outcome{}, fmt.Errorf("record consent of setup session %d: %w", s.id, err)
			}
			note += ", consent recorded"
		} else {
			note += ", NO consent recorded: the session carries no accepted terms of service"
		}
		tag, err := tx.Exec(ctx, setDefaultQuery, s.customerID, pmID, s.id, completedAt)
		if err != nil {
			return outcome{}, fmt.Errorf("set default payment method: %w", err)
		}
		if tag.RowsAffected() == 1 {
			note += ", default set"
		} else if !saved.attached {
			note += ", detached since: not the default"
		}
		if _, err := tx.Exec(ctx, completeSetupQuery, s.id, completedAt, cs.ID, cs.URL); err != nil {
			return outcome{}, fmt.Errorf("complete setup session %d: %w", s.id, err)
		}
		return outcome{eventProcessed, note}, nil
	})
}

// --- checkout.session.expired ---

const (
	expireSetupSessionQuery = `
update billing.setup_sessions set status = 'expired'
where checkout_session_id = $1 and status in ('creating', 'open')
returning id`
	expireRecoverySessionQuery = `
update billing.recovery_sessions set status = 'expired'
where checkout_session_id = $1 and status = 'open'
returning id`
	sessionKnownQuery = `
select coalesce((select status from billing.setup_sessions where checkout_session_id = $1),
                (select status from billing.recovery_sessions where checkout_session_id = $1))`
)

func (w *IngestEventWorker) sessionExpired(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event) error {
	var cs stripe.CheckoutSession
	if err := json.Unmarshal(e.Data.Raw, &cs); err != nil || cs.ID == "" {
		return w.finish(ctx, job, e, outcome{eventFailed, "data.object is not a Checkout Session"})
	}
	return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
		var id int64
		err := tx.QueryRow(ctx, expireSetupSessionQuery, cs.ID).Scan(&id)
		if err == nil {
			return outcome{eventProcessed, "setup session " + strconv.FormatInt(id, 10) + " expired"}, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return outcome{}, fmt.Errorf("expire setup session %s: %w", cs.ID, err)
		}
		err = tx.QueryRow(ctx, expireRecoverySessionQuery, cs.ID).Scan(&id)
		if err == nil {
			return outcome{eventProcessed, "recovery session " + strconv.FormatInt(id, 10) + " expired"}, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return outcome{}, fmt.Errorf("expire recovery session %s: %w", cs.ID, err)
		}
		var status *string
		if err := tx.QueryRow(ctx, sessionKnownQuery, cs.ID).Scan(&status); err != nil {
			return outcome{}, fmt.Errorf("find session %s: %w", cs.ID, err)
		}
		if status == nil {
			return outcome{eventUnknownObject, "no setup or recovery session " + cs.ID}, nil
		}
		return outcome{eventProcessed, "session already " + *status}, nil
	})
}

// --- payment_intent.succeeded / payment_intent.payment_failed ---

func (w *IngestEventWorker) paymentIntentOutcome(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event) error {
	var pi stripe.PaymentIntent
	if err := json.Unmarshal(e.Data.Raw, &pi); err != nil || pi.ID == "" {
		return w.finish(ctx, job, e, outcome{eventFailed, "data.object is not a PaymentIntent"})
	}
	if pi.Metadata["charge_id"] == "" {
		return w.finish(ctx, job, e, outcome{eventIgnored, "payment intent without metadata charge_id: not billingd's"})
	}
	return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
		known, err := SettlePaymentIntentTx(ctx, tx, clientFrom(ctx), w.deps, &pi)
		if err != nil {
			return outcome{}, fmt.Errorf("settle payment intent %s: %w", pi.ID, err)
		}
		if !known {
			return outcome{eventUnknownObject, "no charge known for charge_id " + pi.Metadata["charge_id"]}, nil
		}
		return outcome{eventProcessed, "payment intent " + string(pi.Status)}, nil
	})
}

// --- payment_method.detached / payment_method.automatically_updated ---

const (
	detachPaymentMethodQuery = `
update billing.payment_methods set status = 'detached', detached_at = $2
where stripe_payment_method_id = $1 and status = 'attached'
returning id, customer_id`
	clearDefaultQuery = `
update billing.customers set default_payment_method_id = null, updated_at = now()
where id = $1 and default_payment_method_id = $2`
	paymentMethodStatusQuery = `select status from billing.payment_methods where stripe_payment_method_id = $1`

	// Card details apply only when they are newer than those held (the event's time).
	updateCardQuery = `
update billing.payment_methods
set brand = nullif($2, ''), last4 = nullif($3, ''), exp_month = nullif($4::int, 0), exp_year = nullif($5::int, 0),
    fingerprint = nullif($6, ''), card_updated_at = $7
where stripe_payment_method_id = $1 and (card_updated_at is null or card_updated_at < $7)
returning id`
)

func (w *IngestEventWorker) paymentMethodDetached(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event) error {
	var pm stripe.PaymentMethod
	if err := json.Unmarshal(e.Data.Raw, &pm); err != nil || pm.ID == "" {
		return w.finish(ctx, job, e, outcome{eventFailed, "data.object is not a PaymentMethod"})
	}
	at := time.Unix(e.Created, 0).UTC()
	return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
		var id, customerID int64
		err := tx.QueryRow(ctx, detachPaymentMethodQuery, pm.ID, at).Scan(&id, &customerID)
		if errors.Is(err, pgx.ErrNoRows) {
			var status string
			err := tx.QueryRow(ctx, paymentMethodStatusQuery, pm.ID).Scan(&status)
			if errors.Is(err, pgx.ErrNoRows) {
				return outcome{eventUnknownObject, "no payment method " + pm.ID}, nil
			}
			if err != nil {
				return outcome{}, fmt.Errorf("read payment method %s: %w", pm.ID, err)
			}
			return outcome{eventProcessed, "payment method already " + status}, nil
		}
		if err != nil {
			return outcome{}, fmt.Errorf("detach payment method %s: %w", pm.ID, err)
		}
		tag, err := tx.Exec(ctx, clearDefaultQuery, customerID, id)
		if err != nil {
			return outcome{}, fmt.Errorf("clear default payment method: %w", err)
		}
		if tag.RowsAffected() == 1 {
			// No default now: the customer's next charge goes to recovery, which collects a new method.
			return outcome{eventProcessed, "detached; was the default: future charges go to recovery until a new method is saved"}, nil
		}
		return outcome{eventProcessed, "detached"}, nil
	})
}

func (w *IngestEventWorker) paymentMethodUpdated(ctx context.Context, job *river.Job[IngestEventArgs], e *stripe.Event) error {
	var pm stripe.PaymentMethod
	if err := json.Unmarshal(e.Data.Raw, &pm); err != nil || pm.ID == "" {
		return w.finish(ctx, job, e, outcome{eventFailed, "data.object is not a PaymentMethod"})
	}
	if pm.Card == nil {
		return w.finish(ctx, job, e, outcome{eventIgnored, "not a card"})
	}
	at := time.Unix(e.Created, 0).UTC()
	c := pm.Card
	return w.apply(ctx, job, e, func(tx pgx.Tx) (outcome, error) {
		var id int64
		err := tx.QueryRow(ctx, updateCardQuery, pm.ID, string(c.Brand), c.Last4, c.ExpMonth, c.ExpYear, c.Fingerprint, at).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			var status string
			err := tx.QueryRow(ctx, paymentMethodStatusQuery, pm.ID).Scan(&status)
			if errors.Is(err, pgx.ErrNoRows) {
				return outcome{eventUnknownObject, "no payment method " + pm.ID}, nil
			}
			if err != nil {
				return outcome{}, fmt.Errorf("read payment method %s: %w", pm.ID, err)
			}
			return outcome{eventProcessed, "newer card details already held"}, nil
		}
		if err != nil {
			return outcome{}, fmt.Errorf("update card of %s: %w", pm.ID, err)
		}
		return outcome{eventProcessed, "card details updated"}, nil
	})
}

// retrieveSavedMethod reads the SetupIntent of a completed setup session with its payment method
// and attaches the method to the customer when the session had none. It returns an outcome when
// the event cannot be applied (recorded, not retried) and an error when it should be retried.
func (w *IngestEventWorker) retrieveSavedMethod(ctx context.Context, s *setupRow, cs *stripe.CheckoutSession, raw json.RawMessage) (*savedMethod, *outcome, error) {
	if cs.SetupIntent == nil || cs.SetupIntent.ID == "" {
		return nil, &outcome{eventFailed, "completed setup session without a setup_intent"}, nil
	}
	if w.deps.Stripe == nil {
		return nil, nil, errors.New("no Stripe client configured")
	}
	si, err := w.deps.Stripe.V1SetupIntents.Retrieve(ctx, cs.SetupIntent.ID, stripeapi.SetupIntentRetrieve())
	if err != nil {
		return nil, permanentOutcome(err, "retrieve setup intent "+cs.SetupIntent.ID), fmt.Errorf("retrieve setup intent %s: %w", cs.SetupIntent.ID, err)
	}
	if si.Status != stripe.SetupIntentStatusSucceeded {
		// Asynchronous methods complete later; River retries with backoff.
		return nil, nil, fmt.Errorf("setup intent %s is %s, not succeeded yet", si.ID, si.Status)
	}
	pm := si.PaymentMethod
	if pm == nil || pm.ID == "" {
		return nil, &outcome{eventFailed, "setup intent " + si.ID + " has no payment method"}, nil
	}

	// Whose the session was, and whose the method is now: a Customer (v1) or a customer-configured
	// Account (v2, customer_account, which stripe-go v82 does not decode).
	sessionOwner := owner(customerID(cs.Customer), extraString(raw, "customer_account"))
	var siRaw struct {
		PaymentMethod json.RawMessage `json:"payment_method"`
	}
	if si.LastResponse != nil {
		_ = json.Unmarshal(si.LastResponse.RawJSON, &siRaw)
	}
	pmOwner := owner(customerID(pm.Customer), extraString(siRaw.PaymentMethod, "customer_account"))

	ours := owner(deref(s.stripeCustomerID), "")
	if sessionOwner.account != "" || (sessionOwner.isZero() && w.deps.Config != nil && w.deps.Config.StripeCustomerModel == "account") {
		ours = owner("", deref(s.stripeAccountID))
	}
	switch {
	case ours.isZero():
		return nil, &outcome{eventFailed, "the customer has no Stripe customer or account to attach to"}, nil
	case !sessionOwner.isZero() && sessionOwner != ours:
		return nil, &outcome{eventFailed, "the session belongs to another Stripe customer"}, nil
	}
	saved := &savedMethod{pm: pm, retrieved: time.Now().UTC()}
	switch {
	case pmOwner == ours:
		saved.attached = true
	case pmOwner.isZero() && !sessionOwner.isZero():
		// Checkout attached it to the session's customer; unattached now means detached since.
		saved.attached = false
	case pmOwner.isZero():
		attached, err := w.deps.Stripe.V1PaymentMethods.Attach(ctx, pm.ID, attachParams(ours))
		if err != nil {
			return nil, permanentOutcome(err, "attach payment method "+pm.ID), fmt.Errorf("attach payment method %s: %w", pm.ID, err)
		}
		saved.pm = attached
		saved.retrieved = time.Now().UTC()
		saved.attached = true
	default:
		return nil, &outcome{eventFailed, "payment method " + pm.ID + " belongs to another Stripe customer"}, nil
	}
	return saved, nil, nil
}

// stripeOwner is a Stripe customer: a Customer id (cus_) or an Account id (acct_).
type stripeOwner struct{ customer, account string }

func owner(customer, account string) stripeOwner { return stripeOwner{customer, account} }
func (o stripeOwner) isZero() bool               { return o.customer == "" && o.account == "" }

func customerID(c *stripe.Customer) string {
	if c == nil {
		return ""
	}
	return c.ID
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// extraString reads a top-level string field of a JSON object that stripe-go does not decode.
func extraString(raw json.RawMessage, field string) string {
	var m map[string]json.RawMessage
	if len(raw) == 0 || json.Unmarshal(raw, &m) != nil {
		return ""
	}
	var s string
	_ = json.Unmarshal(m[field], &s)
	return s
}

// permanentOutcome turns a Stripe refusal that no retry can change (400, 404: the object is gone
// or the request is wrong) into a failed outcome; for anything else it returns nil, and the caller
// returns the error for River to retry.
func permanentOutcome(err error, what string) *outcome {
	var se *stripe.Error
	if errors.As(err, &se) && (se.HTTPStatusCode == 400 || se.HTTPStatusCode == 404) {
		return &outcome{eventFailed, fmt.Sprintf("%s: Stripe answered %d %s", what, se.HTTPStatusCode, se.Code)}
	}
	return nil
}

// attachParams attaches to a Customer, or to an Accounts v2 Account (customer_account).
func attachParams(o stripeOwner) *stripe.PaymentMethodAttachParams {
	if o.account != "" {
		return stripeapi.PaymentMethodAttachToAccount(o.account)
	}
	return stripeapi.PaymentMethodAttach(o.customer)
}
