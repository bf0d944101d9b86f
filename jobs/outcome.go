package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
	"github.com/billingd/billingd/internal/stripeapi"
)

// This file holds what the charge job, SettlePaymentIntentTx and the reconcile job share: how a
// Stripe answer is read (a verdict), and how a verdict is written, attempt and charge together,
// in the caller's transaction.

// Idempotency keys: Stripe keeps a key's result for at least 24 hours. A key is replayed only
// well inside that window; an attempt without a PaymentIntent is declared failed (and the charge
// retried with a new key) only well after it, when search can no longer be behind.
const (
	keyReplayWindow = 23 * time.Hour
	keyExpiredAfter = 25 * time.Hour
)

// Metadata billingd puts on every PaymentIntent besides stripeapi.MetadataChargeID and
// stripeapi.MetadataInstallation.
const (
	// MetadataSource is the charge's source: installment, topup or adhoc.
	MetadataSource = "source"
	// MetadataAttempt is the attempt number, which names the attempt (and its idempotency key)
	// that created the PaymentIntent.
	MetadataAttempt = "charge_attempt"
)

// verdict is what an answer from Stripe means for an attempt.
type verdict int

const (
	// verdictTransient: nothing learned (network error, 5xx that may be replayed, 409, 429);
	// try the same key again later.
	verdictTransient verdict = iota
	// verdictUnknown: the request may have done its work and replaying the key cannot tell
	// (a stored 500, an idempotency_error, tries spent); the reconcile job settles it.
	verdictUnknown
	// verdictSucceeded: the money is collected.
	verdictSucceeded
	// verdictDeclined: the card was declined (HTTP 402, or a PaymentIntent that needs a new
	// payment method or the customer's authentication).
	verdictDeclined
	// verdictProcessing: the PaymentIntent is processing; a webhook or reconcile settles it.
	verdictProcessing
	// verdictRejected: Stripe refused the request without charging (a 4xx other than those
	// above, or a canceled PaymentIntent).
	verdictRejected
	// verdictNoPayment: Stripe has no PaymentIntent for the attempt and its key has expired:
	// nothing was charged, the charge is retried with a new attempt.
	verdictNoPayment
)

// answer is one answer from Stripe (or its absence), with what the attempt row keeps of it.
type answer struct {
	verdict     verdict
	pi          *stripe.PaymentIntent
	httpStatus  int
	errType     string
	code        string
	declineCode string
	message     string
	requestID   string
	duration    time.Duration
	err         error // the transport or API error, for logs
}

// readCreateAnswer reads the answer to a PaymentIntent create call.
func readCreateAnswer(pi *stripe.PaymentIntent, err error, took time.Duration) answer {
	a := answer{duration: took, err: err}
	if err == nil {
		a.httpStatus = http.StatusOK
		if pi.LastResponse != nil {
			a.httpStatus = pi.LastResponse.StatusCode
			a.requestID = pi.LastResponse.RequestID
		}
		return fromPaymentIntent(a, pi)
	}
	var se *stripe.Error
	if !errors.As(err, &se) {
		// No answer: a dropped connection (after stripe-go's own retries), a timeout, a
		// cancelled context. The request may or may not have been done; the same key tells.
		a.verdict = verdictTransient
		a.message = err.Error()
		return a
	}
	a.httpStatus = se.HTTPStatusCode
	a.errType = string(se.Type)
	a.code = string(se.Code)
	a.declineCode = string(se.DeclineCode)
	a.message = se.Msg
	a.requestID = se.RequestID
	var shouldRetry string
	var replayed bool
	if se.LastResponse != nil {
		shouldRetry = se.LastResponse.Header.Get("Stripe-Should-Retry")
		replayed = se.LastResponse.Header.Get("Idempotent-Replayed") == "true"
	}
	switch {
	case se.HTTPStatusCode == http.StatusPaymentRequired:
		a.verdict = verdictDeclined
		a.pi = se.PaymentIntent
		if a.pi != nil {
			a.pi.LastResponse = nil
		}
	case se.HTTPStatusCode >= 500 && (shouldRetry == "false" || replayed):
		// Stripe stored this 500 under the key: replaying returns it again. Only reading
		// (search by metadata) can tell what happened.
		a.verdict = verdictUnknown
	case shouldRetry == "true", se.HTTPStatusCode >= 500,
		se.HTTPStatusCode == http.StatusConflict, se.HTTPStatusCode == http.StatusTooManyRequests,
		se.HTTPStatusCode == http.StatusUnauthorized, se.HTTPStatusCode == http.StatusForbidden:
		// 401/403: a key or permission problem that an operator fixes; nothing was done.
		a.verdict = verdictTransient
	case se.Type == stripe.ErrorTypeIdempotency:
		// The key was used with other parameters: what it did is found by searching.
		a.verdict = verdictUnknown
	default:
		a.verdict = verdictRejected
	}
	return a
}

// fromPaymentIntent reads a PaymentIntent's status into a verdict.
func fromPaymentIntent(a answer, pi *stripe.PaymentIntent) answer {
	a.pi = pi
	switch pi.Status {
	case stripe.PaymentIntentStatusSucceeded:
		a.verdict = verdictSucceeded
	case stripe.PaymentIntentStatusProcessing, stripe.PaymentIntentStatusRequiresCapture:
		a.verdict = verdictProcessing
	case stripe.PaymentIntentStatusRequiresAction, stripe.PaymentIntentStatusRequiresConfirmation:
		// Off-session, nobody is there to authenticate: a decline that the customer fixes
		// on the recovery page.
		a.verdict = verdictDeclined
		a.errType, a.code, a.declineCode = string(stripe.ErrorTypeCard), "authentication_required", "authentication_required"
		a.message = "the payment needs the customer's authentication"
	case stripe.PaymentIntentStatusRequiresPaymentMethod:
		a.verdict = verdictDeclined
		if e := pi.LastPaymentError; e != nil {
			a.errType, a.code, a.declineCode, a.message = string(e.Type), string(e.Code), string(e.DeclineCode), e.Msg
		}
	case stripe.PaymentIntentStatusCanceled:
		a.verdict = verdictRejected
		a.message = "the PaymentIntent was canceled"
	default:
		a.verdict = verdictUnknown
		a.message = "PaymentIntent status " + string(pi.Status)
	}
	return a
}

// chargeRow is a charge locked for update, with what charging it needs.
type chargeRow struct {
	id             int64
	status         string
	source         string
	sourceID       *int64
	amount         int64
	currency       string
	description    string
	attemptCount   int
	nextAttemptAt  *time.Time
	customerID     int64
	stripeCustomer *string
	stripeAccount  *string
	defaultPM      *int64
}

const lockChargeQuery = `
select c.id, c.status, c.source, c.source_id, c.amount, c.currency, c.description, c.attempt_count,
       c.next_attempt_at, c.customer_id, cu.stripe_customer_id, cu.stripe_account_id, cu.default_payment_method_id
from billing.charges c
join billing.customers cu on cu.id = c.customer_id
where c.id = $1
for update of c`

func lockCharge(ctx context.Context, tx pgx.Tx, id int64) (*chargeRow, error) {
	var c chargeRow
	err := tx.QueryRow(ctx, lockChargeQuery, id).Scan(&c.id, &c.status, &c.source, &c.sourceID, &c.amount,
		&c.currency, &c.description, &c.attemptCount, &c.nextAttemptAt, &c.customerID, &c.stripeCustomer, &c.stripeAccount, &c.defaultPM)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lock charge %d: %w", id, err)
	}
	return &c, nil
}

// attemptRow is one row of billing.charge_attempts with what a replay of its request needs.
type attemptRow struct {
	id              int64
	chargeID        int64
	attemptNo       int
	key             string
	outcome         string
	tries           int
	startedAt       time.Time
	lastTryAt       *time.Time
	paymentIntentID *string
	piStatus        *string
	description     *string
	stripePM        string
	stripeCustomer  *string
	stripeAccount   *string
	amount          int64
	currency        string
	source          string
	jobID           *int64
}

const attemptColumns = `
select a.id, a.charge_id, a.attempt_no, a.idempotency_key, a.outcome, a.tries, a.started_at, a.last_try_at,
       a.payment_intent_id, a.payment_intent_status, a.description, pm.stripe_payment_method_id,
       cu.stripe_customer_id, cu.stripe_account_id, c.amount, c.currency, c.source, a.job_id
from billing.charge_attempts a
join billing.charges c on c.id = a.charge_id
join billing.customers cu on cu.id = c.customer_id
join billing.payment_methods pm on pm.id = a.payment_method_id`

// openAttemptQuery finds the charge's open attempt (at most one: a unique index).
const openAttemptQuery = attemptColumns + `
where a.charge_id = $1 and a.outcome in ('in_flight', 'unknown')
for update of a`

// attemptByIDQuery locks one attempt.
const attemptByIDQuery = attemptColumns + `
where a.id = $1
for update of a`

// attemptForPIQuery finds the attempt that created a PaymentIntent: by its id once known,
// else by the attempt number in its metadata.
const attemptForPIQuery = attemptColumns + `
where a.charge_id = $1 and (a.payment_intent_id = $2 or (a.attempt_no = $3 and a.payment_intent_id is null))
order by a.payment_intent_id is null
limit 1
for update of a`

func scanAttempt(row pgx.Row) (*attemptRow, error) {
	var a attemptRow
	err := row.Scan(&a.id, &a.chargeID, &a.attemptNo, &a.key, &a.outcome, &a.tries, &a.startedAt, &a.lastTryAt,
		&a.paymentIntentID, &a.piStatus, &a.description, &a.stripePM, &a.stripeCustomer, &a.stripeAccount, &a.amount, &a.currency, &a.source, &a.jobID)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &a, nil
}

// open says whether the attempt's outcome is still to be learned.
func (a *attemptRow) open() bool { return a.outcome == "in_flight" || a.outcome == "unknown" }

// charging is what settling needs besides the transaction: the decline policy, the logger and
// when to reconcile an attempt whose outcome became unknown.
type charging struct {
	policy         DeclinePolicy
	logger         *slog.Logger
	reconcileAfter time.Duration
}

// chargingOf returns the charging settings that Register gave d, or the defaults for a Deps
// that was never registered (a test settling one PaymentIntent by hand).
func chargingOf(d *Deps) *charging {
	if d != nil && d.charging != nil {
		return d.charging
	}
	logger := slog.Default()
	if d != nil && d.Logger != nil {
		logger = d.Logger
	}
	return &charging{policy: DefaultDeclinePolicy(), logger: logger, reconcileAfter: 2 * time.Minute}
}

const updateAttemptQuery = `
update billing.charge_attempts set
    outcome               = $2,
    http_status           = coalesce($3, http_status),
    error_type            = $4,
    error_code            = $5,
    decline_code          = $6,
    error_message         = $7,
    payment_intent_id     = coalesce($8, payment_intent_id),
    payment_intent_status = coalesce($9, payment_intent_status),
    stripe_request_id     = coalesce($10, stripe_request_id),
    duration_ms           = coalesce($11, duration_ms),
    finished_at           = case when $2 in ('in_flight', 'unknown') then null else now() end,
    settled_by            = $12,
    note                  = coalesce($13, note)
where id = $1`

const updateChargeStatusQuery = `
update billing.charges
set status = $2, status_reason = $3, next_attempt_at = $4, payment_intent_id = coalesce($5, payment_intent_id)
where id = $1`

const countChargeDeclinesQuery = `
select count(*) from billing.charge_attempts where charge_id = $1 and outcome = 'declined'`

// countCardDeclinesQuery counts the declines of one card within the window, by fingerprint
// when known (the same card saved twice is one card to the networks).
const countCardDeclinesQuery = `
select count(*)
from billing.charge_attempts a
join billing.payment_methods pm on pm.id = a.payment_method_id
join billing.payment_methods card on card.id = $1
where a.outcome = 'declined'
  and a.started_at > now() - make_interval(secs => $2)
  and (pm.id = card.id or (card.fingerprint is not null and pm.fingerprint = card.fingerprint))`

// settleInput is a verdict to record and who reached it.
type settleInput struct {
	answer
	settledBy string // job, webhook, reconcile
	note      string
}

// settleTx writes an answer for attempt a of charge c (both locked by the caller) in tx: the
// attempt's outcome and, when the charge is still processing this attempt, the charge's new
// state, its retry job, its recovery. It returns the outcome label for metrics. An attempt
// already settled is left as it is.
func (s *charging) settleTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], c *chargeRow, a *attemptRow, in settleInput) (string, error) {
	if !a.open() {
		return "already_settled", nil
	}
	log := s.logger.With("charge_id", c.id, "attempt_no", a.attemptNo)
	var piID, piStatus *string
	if in.pi != nil && in.pi.ID != "" {
		piID, piStatus = &in.pi.ID, ptr(string(in.pi.Status))
	}
	var httpStatus, durationMS *int
	if in.httpStatus != 0 {
		httpStatus = &in.httpStatus
	}
	if in.duration > 0 {
		durationMS = ptr(int(in.duration.Milliseconds()))
	}
	outcome, settledBy := "", &in.settledBy
	switch in.verdict {
	case verdictSucceeded:
		outcome = "succeeded"
	case verdictDeclined:
		outcome = "declined"
	case verdictRejected, verdictNoPayment:
		outcome = "failed"
	case verdictProcessing:
		outcome, settledBy = "in_flight", nil
	case verdictTransient:
		outcome, settledBy = a.outcome, nil // nothing learned: in flight stays, unknown stays
	case verdictUnknown:
		outcome, settledBy = "unknown", nil
	}
	if _, err := tx.Exec(ctx, updateAttemptQuery, a.id, outcome, httpStatus, nz(in.errType), nz(in.code),
		nz(in.declineCode), nz(in.message), piID, piStatus, nz(in.requestID), durationMS, settledBy, nz(in.note)); err != nil {
		return "", fmt.Errorf("record attempt %d of charge %d: %w", a.attemptNo, c.id, err)
	}
	current := c.status == "processing" // the charge still waits for this attempt

	switch in.verdict {
	case verdictTransient:
		return "transient", nil
	case verdictProcessing:
		return "processing", nil
	case verdictUnknown:
		if err := insertReconcile(ctx, tx, client, c.id, s.reconcileAfter); err != nil {
			return "", err
		}
		log.Warn("charge outcome unknown; left to reconcile", "error_type", in.errType, "http_status", in.httpStatus)
		return "unknown", nil

	case verdictSucceeded:
		switch c.status {
		case "processing":
			if err := setCharge(ctx, tx, c.id, "succeeded", fmt.Sprintf("collected by attempt %d", a.attemptNo), nil, piID); err != nil {
				return "", err
			}
		case "retry_scheduled", "recovering", "uncollectible":
			// Money that arrives late is still money.
			if err := setCharge(ctx, tx, c.id, "recovered", fmt.Sprintf("collected late by attempt %d", a.attemptNo), nil, piID); err != nil {
				return "", err
			}
		default:
			// Collected twice (the recovery page was paid while this attempt was in flight),
			// or collected for a canceled charge: this later payment is refunded, in this
			// transaction's refund job, and recorded in billing.refunds.
			log.Error("charge collected although no longer due; refunding this payment", "charge_status", c.status, "payment_intent_id", in.pi.ID)
			if _, err := RefundDuplicateTx(ctx, tx, client, c.id, in.pi.ID, in.pi.Amount, string(in.pi.Currency)); err != nil {
				return "", err
			}
			return "double_collected", nil
		}
		// The charge's open recovery closes, and its page expires, by the trigger
		// billing.charges_close_recovery.
		return "succeeded", nil

	case verdictNoPayment:
		if !current {
			return "failed", nil
		}
		now := time.Now()
		reason := fmt.Sprintf("attempt %d never reached Stripe; retrying with a new attempt", a.attemptNo)
		if err := setCharge(ctx, tx, c.id, "retry_scheduled", reason, &now, nil); err != nil {
			return "", err
		}
		if err := insertCharge(ctx, tx, client, c.id, now); err != nil {
			return "", err
		}
		return "retry_scheduled", nil

	case verdictRejected:
		if !current {
			return "failed", nil
		}
		reason := fmt.Sprintf("Stripe refused attempt %d: %s", a.attemptNo, firstNonEmpty(in.code, in.message, "no reason given"))
		if err := setCharge(ctx, tx, c.id, "recovering", reason, nil, piID); err != nil {
			return "", err
		}
		if _, err := StartRecoveryTx(ctx, tx, client, c.id, reason); err != nil {
			return "", err
		}
		log.Warn("charge refused by Stripe; recovery started", "error_code", in.code, "http_status", in.httpStatus)
		return "recovering", nil

	case verdictDeclined:
		metrics.Declines.WithLabelValues(firstNonEmpty(in.declineCode, in.code, "unspecified")).Inc()
		if !current {
			return "declined", nil
		}
		var chargeDeclines, cardDeclines int
		if err := tx.QueryRow(ctx, countChargeDeclinesQuery, c.id).Scan(&chargeDeclines); err != nil {
			return "", fmt.Errorf("count declines of charge %d: %w", c.id, err)
		}
		pmID, err := attemptPaymentMethod(ctx, tx, a.id)
		if err != nil {
			return "", err
		}
		if err := tx.QueryRow(ctx, countCardDeclinesQuery, pmID, s.policy.CardWindow.Seconds()).Scan(&cardDeclines); err != nil {
			return "", fmt.Errorf("count declines of the card of charge %d: %w", c.id, err)
		}
		d := s.policy.Decide(Decline{Code: in.code, DeclineCode: in.declineCode,
			ChargeDeclines: chargeDeclines, CardDeclines: cardDeclines, At: time.Now()})
		label := "recovering"
		if d.Retry {
			label = "retry_scheduled"
			if err := setCharge(ctx, tx, c.id, "retry_scheduled", d.Reason, &d.NextAttemptAt, piID); err != nil {
				return "", err
			}
			if err := insertCharge(ctx, tx, client, c.id, d.NextAttemptAt); err != nil {
				return "", err
			}
		} else if err := setCharge(ctx, tx, c.id, "recovering", d.Reason, nil, piID); err != nil {
			return "", err
		}
		// Every decline gives the customer a way to pay on-session. A scheduled retry
		// re-checks the charge under lock, so the two never both collect.
		if _, err := StartRecoveryTx(ctx, tx, client, c.id, d.Reason); err != nil {
			return "", err
		}
		log.Info("charge declined", "decline_code", in.declineCode, "error_code", in.code,
			"retry", d.Retry, "next_attempt_at", d.NextAttemptAt)
		return label, nil
	}
	return "", fmt.Errorf("settle charge %d: unhandled verdict %d", c.id, in.verdict)
}

func attemptPaymentMethod(ctx context.Context, tx pgx.Tx, attemptID int64) (int64, error) {
	var id int64
	if err := tx.QueryRow(ctx, `select payment_method_id from billing.charge_attempts where id = $1`, attemptID).Scan(&id); err != nil {
		return 0, fmt.Errorf("payment method of attempt %d: %w", attemptID, err)
	}
	return id, nil
}

func setCharge(ctx context.Context, tx pgx.Tx, id int64, status, reason string, next *time.Time, piID *string) error {
	if _, err := tx.Exec(ctx, updateChargeStatusQuery, id, status, reason, next, piID); err != nil {
		return fmt.Errorf("set charge %d %s: %w", id, status, err)
	}
	return nil
}

// insertCharge inserts a charge job for id, to run at at.
func insertCharge(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], id int64, at time.Time) error {
	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	opts := &river.InsertOpts{}
	if at.After(time.Now()) {
		opts.ScheduledAt = at // else available at once, without waiting for River's scheduler
	}
	if _, err := client.InsertTx(ctx, tx, ChargeArgs{ChargeID: id}, opts); err != nil {
		return fmt.Errorf("insert charge job for charge %d: %w", id, err)
	}
	return nil
}

// insertReconcile asks the reconcile job to settle the charge's open attempt after delay.
func insertReconcile(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], id int64, delay time.Duration) error {
	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	if _, err := client.InsertTx(ctx, tx, ReconcileArgs{ChargeID: id}, &river.InsertOpts{ScheduledAt: time.Now().Add(delay)}); err != nil {
		return fmt.Errorf("insert reconcile job for charge %d: %w", id, err)
	}
	return nil
}

// countOutcome counts a settled outcome; call it after the transaction committed.
func countOutcome(label string) {
	if label != "" && label != "already_settled" {
		metrics.ChargeOutcomes.WithLabelValues(label).Inc()
	}
}

func nz(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func ptr[T any](v T) *T { return &v }

func firstNonEmpty(ss ...string) string {
	for _, s := range ss {
		if s != "" {
			return s
		}
	}
	return ""
}

// chargeMetadata is the metadata of an attempt's PaymentIntent: charge_id, source, charge_attempt
// and, unless it is empty (an attempt recorded before keys named the installation),
// billingd_installation.
func chargeMetadata(chargeID int64, source string, attemptNo int, installation string) map[string]string {
	md := map[string]string{
		stripeapi.MetadataChargeID: strconv.FormatInt(chargeID, 10),
		MetadataSource:             source,
		MetadataAttempt:            strconv.Itoa(attemptNo),
	}
	if installation != "" {
		md[stripeapi.MetadataInstallation] = installation
	}
	return md
}
