package jobs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/billingd/billingd/internal/stripeapi"
)

// ChargeArgs asks for one charge to be collected off-session. The charge row is the truth: the
// job only names it, so running the job twice, or after the charge was settled, is harmless.
//
// Inserted by the due computation, by billing.enqueue_charge (from SQL, as
// {"charge_id": N} with kind 'charge' on queue 'charges') and by retries of soft declines.
type ChargeArgs struct {
	ChargeID int64 `json:"charge_id"`
}

// Kind is the job kind, also used by billing.enqueue_charge in SQL: keep it stable.
func (ChargeArgs) Kind() string { return "charge" }

// InsertOpts puts charge jobs on their own queue.
func (ChargeArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueCharges, MaxAttempts: 25}
}

// ChargeWorker collects a charge off-session with a PaymentIntent, exactly once.
//
// In a first transaction it locks the charge and either resumes its open attempt (a River retry
// after a transient failure: same attempt, same idempotency key) or checks that the charge is
// still due, that an active consent covers its source and that a default payment method is
// attached, and records a new attempt (attempt_count+1, a new key). It commits before calling
// Stripe, so that a crash during the call leaves a record of what may have been sent. It then
// creates the PaymentIntent, and writes the outcome and the charge's new state in one more
// transaction, together with the job's completion.
//
// A transient failure (no answer, a 5xx that Stripe did not store, 409, 429) returns an error,
// and River retries the job after NextRetry's backoff with the same key. After
// Config.ChargeMaxTries calls, or once the key is too old to replay safely, the attempt's outcome
// becomes unknown and the reconcile job settles it from Stripe.
type ChargeWorker struct {
	river.WorkerDefaults[ChargeArgs]
	deps     *Deps
	charging *charging
}

// NewChargeWorker returns the charge worker. It fails when the decline policy settings are
// invalid.
func NewChargeWorker(d *Deps) (*ChargeWorker, error) {
	policy, err := DeclinePolicyFromConfig(d.Config)
	if err != nil {
		return nil, err
	}
	return &ChargeWorker{deps: d, charging: &charging{
		policy: policy, logger: d.Logger, reconcileAfter: d.Config.ReconcileAfter,
	}}, nil
}

// NextRetry backs off exponentially from Config.ChargeBackoff (doubling, at most 5 minutes,
// with up to 20% jitter so that a burst of failures does not come back as a burst).
func (w *ChargeWorker) NextRetry(job *river.Job[ChargeArgs]) time.Time {
	return time.Now().Add(chargeBackoff(w.deps.Config.ChargeBackoff, job.Attempt))
}

func chargeBackoff(base time.Duration, attempt int) time.Duration {
	const ceiling = 5 * time.Minute
	d := base
	for i := 1; i < attempt && d < ceiling; i++ {
		d *= 2
	}
	d = min(d, ceiling)
	return d + time.Duration(rand.Int64N(int64(d)/5+1))
}

// sendPlan is one call to make: the attempt's key and the exact request.
type sendPlan struct {
	chargeID    int64
	attemptID   int64
	attemptNo   int
	key         string
	customer    string // the Stripe Customer (cus_...), or
	account     string // the Accounts v2 customer-configured Account (acct_...), in account mode
	pm          string
	amount      int64
	currency    string
	description string
	source      string
}

// planFromAttempt rebuilds an attempt's request, to send it again with its key.
func planFromAttempt(d *Deps, a *attemptRow) *sendPlan {
	p := &sendPlan{chargeID: a.chargeID, attemptID: a.id, attemptNo: a.attemptNo, key: a.key,
		pm: a.stripePM, amount: a.amount, currency: a.currency, source: a.source}
	switch {
	case accountModel(d) && a.stripeAccount != nil:
		p.account = *a.stripeAccount
	case a.stripeCustomer != nil:
		p.customer = *a.stripeCustomer
	}
	if a.description != nil {
		p.description = *a.description
	}
	return p
}

// Work runs one charge job.
func (w *ChargeWorker) Work(ctx context.Context, job *river.Job[ChargeArgs]) error {
	plan, label, err := w.prepare(ctx, job)
	countOutcome(label)
	if err != nil || plan == nil {
		return err
	}
	ans := w.send(ctx, plan)
	// The outcome is written even when the job's context ended during the call (shutdown,
	// timeout): what Stripe said must not be lost.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	return w.record(wctx, job, plan, ans)
}

// prepare decides, under the charge's row lock, whether to send and what. A nil plan means
// there is nothing to send; the job is then complete.
func (w *ChargeWorker) prepare(ctx context.Context, job *river.Job[ChargeArgs]) (*sendPlan, string, error) {
	id := job.Args.ChargeID
	log := w.deps.Logger.With("charge_id", id, "job_id", job.ID)
	installation, err := w.deps.Installation(ctx)
	if err != nil {
		return nil, "", fmt.Errorf("charge %d: %w", id, err)
	}
	tx, err := w.deps.Pool.Begin(ctx)
	if err != nil {
		return nil, "", fmt.Errorf("begin charge %d: %w", id, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit it is a no-op

	c, err := lockCharge(ctx, tx, id)
	if err != nil {
		return nil, "", err
	}
	if c == nil {
		return nil, "", river.JobCancel(fmt.Errorf("charge %d does not exist", id))
	}

	open, err := scanAttempt(tx.QueryRow(ctx, openAttemptQuery, id))
	if err != nil {
		return nil, "", fmt.Errorf("open attempt of charge %d: %w", id, err)
	}
	var plan *sendPlan
	label := ""
	switch {
	case open != nil:
		plan, label, err = w.resume(ctx, tx, job, c, open)
	case c.status != "pending" && c.status != "retry_scheduled":
		log.Info("charge not due; nothing to do", "charge_status", c.status)
		label = "skipped"
	case c.status == "retry_scheduled" && c.nextAttemptAt != nil && c.nextAttemptAt.After(time.Now()):
		// Early (clocks differ, or a duplicate job): wait for the calendar, change nothing.
		log.Info("charge retry not due yet; waiting", "next_attempt_at", *c.nextAttemptAt)
		return nil, "", river.JobSnooze(time.Until(*c.nextAttemptAt) + time.Second)
	default:
		plan, label, err = w.begin(ctx, tx, job, c, installation)
	}
	if err != nil {
		return nil, "", err
	}
	if plan == nil {
		if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
			return nil, "", fmt.Errorf("complete charge job %d: %w", job.ID, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, "", fmt.Errorf("commit charge %d: %w", id, err)
	}
	return plan, label, nil
}

// bumpTriesQuery counts one more call with the attempt's key, by job $2 (null: reconcile).
const bumpTriesQuery = `
update billing.charge_attempts set tries = tries + 1, last_try_at = now(), job_id = coalesce($2, job_id) where id = $1`

// resume handles a charge whose attempt is open: the same key is sent again while that is
// safe and useful, and otherwise the attempt is left to its owner or to reconcile.
func (w *ChargeWorker) resume(ctx context.Context, tx pgx.Tx, job *river.Job[ChargeArgs], c *chargeRow, a *attemptRow) (*sendPlan, string, error) {
	log := w.deps.Logger.With("charge_id", c.id, "attempt_no", a.attemptNo)
	switch {
	case a.jobID != nil && *a.jobID != job.ID && a.lastTryAt != nil && time.Since(*a.lastTryAt) < w.deps.Config.ReconcileAfter:
		// A duplicate job: the attempt's own job is sending it, or will retry it.
		log.Info("charge attempt belongs to another job; nothing to do", "owner_job_id", *a.jobID)
		return nil, "skipped", nil
	case a.outcome == "unknown":
		log.Info("charge attempt outcome unknown; reconcile settles it")
		return nil, "skipped", nil
	case a.piStatus != nil && *a.piStatus == "processing":
		log.Info("charge payment processing; a webhook or reconcile settles it")
		return nil, "skipped", nil
	case a.tries >= w.deps.Config.ChargeMaxTries || time.Since(a.startedAt) > keyReplayWindow:
		_, err := w.charging.settleTx(ctx, tx, nil, c, a, settleInput{answer: answer{verdict: verdictUnknown,
			message: fmt.Sprintf("no definite answer after %d calls", a.tries)}})
		return nil, "unknown", err
	}
	if _, err := tx.Exec(ctx, bumpTriesQuery, a.id, job.ID); err != nil {
		return nil, "", fmt.Errorf("count try of attempt %d of charge %d: %w", a.attemptNo, c.id, err)
	}
	log.Info("charge attempt resumed with its idempotency key", "tries", a.tries+1)
	return planFromAttempt(w.deps, a), "", nil
}

const (
	// chargeChecksQuery reads, for the charge's customer, whether an active consent covers the
	// use, the default payment method, and whether the charge's source was canceled.
	chargeChecksQuery = `
select
    exists (select 1 from billing.consents k
            where k.customer_id = $1 and k.revoked_at is null and $2 = any (k.usage)) as consented,
    pm.stripe_payment_method_id,
    pm.status,
    case $3
        when 'installment' then (select p.status = 'canceled' from billing.installment_plans p where p.id = $4)
        when 'topup' then (select r.status = 'canceled' from billing.topup_rules r where r.id = $4)
        else false
    end as source_canceled
from (select) one
left join billing.payment_methods pm on pm.id = $5 and pm.customer_id = $1`

	insertAttemptQuery = `
insert into billing.charge_attempts (charge_id, attempt_no, idempotency_key, payment_method_id, description, job_id, tries, last_try_at)
values ($1, $2, $3, $4, $5, $6, 1, now())
returning id`

	startChargeQuery = `
update billing.charges
set status = 'processing', attempt_count = $2, payment_method_id = $3, next_attempt_at = null, status_reason = $4
where id = $1`
)

// consentUsage maps a charge's source to the consent usage that must cover it.
var consentUsage = map[string]string{"installment": "installments", "topup": "topups", "adhoc": "adhoc"}

// IdempotencyKey returns the Stripe idempotency key of a charge's attempt in installation,
// "billingd-<installation>-charge-<charge>-attempt-<n>". A retry of the same attempt reuses it
// (as stored with the attempt: an attempt recorded before keys named the installation keeps its
// "billingd-charge-<charge>-attempt-<n>"); a new attempt gets a new one.
func IdempotencyKey(installation string, chargeID int64, attemptNo int) string {
	return stripeapi.KeyPrefix(installation) + fmt.Sprintf("charge-%d-attempt-%d", chargeID, attemptNo)
}

// begin runs the checks and records a new attempt, or sends the charge to recovery (or cancels
// it) when a check fails.
func (w *ChargeWorker) begin(ctx context.Context, tx pgx.Tx, job *river.Job[ChargeArgs], c *chargeRow, installation string) (*sendPlan, string, error) {
	log := w.deps.Logger.With("charge_id", c.id)
	var (
		consented      bool
		stripePM       *string
		pmStatus       *string
		sourceCanceled *bool
	)
	var pmID int64
	if c.defaultPM != nil {
		pmID = *c.defaultPM
	}
	if err := tx.QueryRow(ctx, chargeChecksQuery, c.customerID, consentUsage[c.source], c.source, c.sourceID, pmID).
		Scan(&consented, &stripePM, &pmStatus, &sourceCanceled); err != nil {
		return nil, "", fmt.Errorf("check charge %d: %w", c.id, err)
	}
	var reason string
	switch {
	case sourceCanceled != nil && *sourceCanceled:
		reason = fmt.Sprintf("the %s was canceled", map[string]string{"installment": "installment plan", "topup": "top-up rule"}[c.source])
		if err := setCharge(ctx, tx, c.id, "canceled", reason, nil, nil); err != nil {
			return nil, "", err
		}
		log.Info("charge canceled: no longer due", "reason", reason)
		return nil, "canceled", nil
	case !consented:
		reason = fmt.Sprintf("no active consent covers %s charges", c.source)
	case accountModel(w.deps) && c.stripeAccount == nil:
		reason = "the customer has no Stripe account (customer_account)"
	case !accountModel(w.deps) && c.stripeCustomer == nil:
		reason = "the customer has no Stripe customer"
	case stripePM == nil:
		reason = "the customer has no default payment method"
	case *pmStatus != "attached":
		reason = "the default payment method is no longer attached"
	}
	if reason == "" && c.status == "retry_scheduled" {
		var cardDeclines int
		if err := tx.QueryRow(ctx, countCardDeclinesQuery, pmID, w.charging.policy.CardWindow.Seconds()).Scan(&cardDeclines); err != nil {
			return nil, "", fmt.Errorf("count card declines for charge %d: %w", c.id, err)
		}
		if cardDeclines >= w.charging.policy.MaxCardDeclines {
			reason = fmt.Sprintf("card declined %d times in %s: no further automatic retry (card network limit)",
				cardDeclines, formatDays(w.charging.policy.CardWindow))
		}
	}
	if reason != "" {
		if err := setCharge(ctx, tx, c.id, "recovering", reason, nil, nil); err != nil {
			return nil, "", err
		}
		if _, err := StartRecoveryTx(ctx, tx, nil, c.id, reason); err != nil {
			return nil, "", err
		}
		log.Warn("charge not sent; recovery started", "reason", reason)
		return nil, "recovering", nil
	}

	n := c.attemptCount + 1
	key := IdempotencyKey(installation, c.id, n)
	var attemptID int64
	if err := tx.QueryRow(ctx, insertAttemptQuery, c.id, n, key, pmID, c.description, job.ID).Scan(&attemptID); err != nil {
		return nil, "", fmt.Errorf("record attempt %d of charge %d: %w", n, c.id, err)
	}
	if _, err := tx.Exec(ctx, startChargeQuery, c.id, n, pmID, fmt.Sprintf("attempt %d sent", n)); err != nil {
		return nil, "", fmt.Errorf("mark charge %d processing: %w", c.id, err)
	}
	plan := &sendPlan{chargeID: c.id, attemptID: attemptID, attemptNo: n, key: key,
		pm: *stripePM, amount: c.amount, currency: c.currency, description: c.description, source: c.source}
	if accountModel(w.deps) {
		plan.account = *c.stripeAccount
	} else {
		plan.customer = *c.stripeCustomer
	}
	return plan, "", nil
}

// send creates the PaymentIntent. It never touches the database.
func (w *ChargeWorker) send(ctx context.Context, p *sendPlan) answer {
	return sendPaymentIntent(ctx, w.deps, p)
}

// accountModel says whether customers are Accounts v2 customer-configured Accounts.
func accountModel(d *Deps) bool { return d.Config != nil && d.Config.StripeCustomerModel == "account" }

// sendPaymentIntent sends the attempt's request. Its metadata names the installation that its key
// names, so that a replay is the same request as the first send (Stripe refuses a key reused with
// other parameters): an attempt recorded before keys named the installation is sent again
// without it, as it was first sent.
func sendPaymentIntent(ctx context.Context, d *Deps, p *sendPlan) answer {
	md := chargeMetadata(p.chargeID, p.source, p.attemptNo, stripeapi.KeyInstallation(p.key))
	params := stripeapi.OffSessionPaymentIntent(p.customer, p.pm, p.amount, p.currency, p.description, md, p.key)
	if p.account != "" {
		params = stripeapi.OffSessionPaymentIntentForAccount(p.account, p.pm, p.amount, p.currency, p.description, md, p.key)
	}
	start := time.Now()
	pi, err := d.Stripe.V1PaymentIntents.Create(ctx, params)
	return readCreateAnswer(pi, err, time.Since(start))
}

// record writes the answer in one transaction with the job's completion. A transient answer
// is recorded on the attempt and returned as an error, so that River retries the job.
func (w *ChargeWorker) record(ctx context.Context, job *river.Job[ChargeArgs], p *sendPlan, ans answer) error {
	log := w.deps.Logger.With("charge_id", p.chargeID, "attempt_no", p.attemptNo, "job_id", job.ID)
	tx, err := w.deps.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin outcome of charge %d: %w", p.chargeID, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit it is a no-op
	c, err := lockCharge(ctx, tx, p.chargeID)
	if err != nil {
		return err
	}
	a, err := scanAttempt(tx.QueryRow(ctx, attemptByIDQuery, p.attemptID))
	if err != nil || a == nil || c == nil {
		return errors.Join(fmt.Errorf("attempt %d of charge %d vanished", p.attemptNo, p.chargeID), err)
	}
	label, err := w.charging.settleTx(ctx, tx, nil, c, a, settleInput{answer: ans, settledBy: "job"})
	if err != nil {
		return err
	}
	if ans.verdict == verdictTransient && a.open() {
		if err := tx.Commit(ctx); err != nil {
			return fmt.Errorf("commit transient outcome of charge %d: %w", p.chargeID, err)
		}
		countOutcome(label)
		log.Warn("charge call failed transiently; retrying with the same key",
			"http_status", ans.httpStatus, "error_code", ans.code, "error", ans.err)
		return fmt.Errorf("charge %d attempt %d: transient: %w", p.chargeID, p.attemptNo, ans.err)
	}
	if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
		return fmt.Errorf("complete charge job %d: %w", job.ID, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit outcome of charge %d: %w", p.chargeID, err)
	}
	countOutcome(label)
	// One line per settled attempt at info: with the due computation's, the recovery jobs' and the
	// webhooks' lines, charge_id follows a charge from due to collected.
	piID := ""
	if ans.pi != nil {
		piID = ans.pi.ID
	}
	log.Info("charge attempt settled", "outcome", label, "payment_intent_id", piID, "stripe_request_id", ans.requestID)
	return nil
}

// chargeKinds lists the job kinds of charging.
func chargeKinds() []string {
	return []string{ChargeArgs{}.Kind(), ReconcileArgs{}.Kind()}
}

// registerCharge adds the charge and reconcile workers, and keeps their settings in d for
// SettlePaymentIntentTx.
func registerCharge(workers *river.Workers, d *Deps) error {
	charge, err := NewChargeWorker(d)
	if err != nil {
		return fmt.Errorf("charge worker: %w", err)
	}
	d.charging = charge.charging
	for _, err := range []error{
		river.AddWorkerSafely(workers, charge),
		river.AddWorkerSafely(workers, &ReconcileWorker{deps: d, charging: charge.charging}),
	} {
		if err != nil {
			return fmt.Errorf("charge workers: %w", err)
		}
	}
	return nil
}

// chargePeriodicJobs returns the reconcile sweep.
func chargePeriodicJobs(d *Deps) ([]*river.PeriodicJob, error) {
	reconcile, err := reconcilePeriodic(d.Config.ReconcileSchedule)
	if err != nil {
		return nil, err
	}
	return []*river.PeriodicJob{reconcile}, nil
}
