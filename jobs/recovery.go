package jobs

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

// NotifyRecoveryArgs asks for the customer of a failed charge to be told, with a link to pay
// through a Checkout Session in mode=payment. Round counts recovery rounds of the charge, so
// that each round has its own idempotency key and a retried job reuses its round's key.
type NotifyRecoveryArgs struct {
	ChargeID int64 `json:"charge_id"`
	Round    int   `json:"round"`
}

// Kind is the job kind.
func (NotifyRecoveryArgs) Kind() string { return "notify_recovery" }

// InsertOpts puts recovery notifications on the notifications queue.
func (NotifyRecoveryArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueNotifications, MaxAttempts: 20}
}

// startRecoveryQuery opens the charge's recovery if none is open yet. It returns the round only
// when it opened one, so that a second failure of the same charge, or a job run twice, inserts
// no second notification.
const startRecoveryQuery = `
insert into billing.recoveries (charge_id, token, reason)
values ($1, $2, $3)
on conflict (charge_id) do update
    set round = billing.recoveries.round + 1, reason = excluded.reason, status = 'open',
        closed_at = null, opened_at = now()
    where billing.recoveries.status <> 'open'
returning round`

// StartRecoveryTx opens recovery for a charge that failed off-session (a 402, or checks that
// failed before any call) and inserts its notify_recovery job, in the caller's transaction: the
// failure is never recorded without its notification, and never notified twice. It needs a River
// client in ctx (true inside a job; river.ClientFromContext) or passed as client.
func StartRecoveryTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], chargeID int64, reason string) (opened bool, err error) {
	token, err := newToken()
	if err != nil {
		return false, err
	}
	var round int
	err = tx.QueryRow(ctx, startRecoveryQuery, chargeID, token, reason).Scan(&round)
	if err == pgx.ErrNoRows {
		return false, nil // already open: the customer already has a link
	}
	if err != nil {
		return false, fmt.Errorf("open recovery for charge %d: %w", chargeID, err)
	}
	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	if _, err := client.InsertTx(ctx, tx, NotifyRecoveryArgs{ChargeID: chargeID, Round: round}, nil); err != nil {
		return false, fmt.Errorf("insert notify_recovery for charge %d: %w", chargeID, err)
	}
	return true, nil
}

// newToken returns an unguessable URL-safe token (256 bits) for a recovery link.
func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("recovery token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// recoveryState is a recovery with its charge, customer and latest session of the round.
type recoveryState struct {
	ChargeID      int64
	Token         string
	Round         int
	Reason        string
	Status        string // billing.recoveries.status
	OpenedAt      time.Time
	RemindersSent int
	NextSeq       int // seq of the next session to create

	ChargeStatus string
	Amount       int64
	Currency     string
	Description  string

	CustomerID       int64
	CustomerRef      string
	Email            string
	StripeCustomerID string // empty when the customer has none yet

	// The latest session of this round, if any (SessionSeq 0 when none).
	SessionSeq       int
	SessionID        string
	SessionURL       string
	SessionExpiresAt time.Time
	SessionStatus    string
}

// collectable reports whether the charge still waits for the customer's money.
func (s recoveryState) collectable() bool {
	switch s.ChargeStatus {
	case "pending", "processing", "retry_scheduled", "recovering":
		return s.Status == "open"
	}
	return false
}

const recoveryStateColumns = `
select r.charge_id, r.token, r.round, r.reason, r.status, r.opened_at, r.reminders_sent, r.next_session_seq,
       c.status, c.amount, c.currency, c.description,
       cu.id, cu.customer_ref, coalesce(cu.email, ''), coalesce(cu.stripe_customer_id, ''),
       coalesce(s.seq, 0), coalesce(s.checkout_session_id, ''), coalesce(s.url, ''),
       coalesce(s.expires_at, 'epoch'), coalesce(s.status, '')
from billing.recoveries r
join billing.charges c on c.id = r.charge_id
join billing.customers cu on cu.id = c.customer_id
left join lateral (
    select rs.seq, rs.checkout_session_id, rs.url, rs.expires_at, rs.status
    from billing.recovery_sessions rs
    where rs.charge_id = r.charge_id and rs.round = r.round
    order by rs.seq desc
    limit 1
) s on true`

const (
	recoveryByChargeQuery = recoveryStateColumns + "\nwhere r.charge_id = $1"
	recoveryByTokenQuery  = recoveryStateColumns + "\nwhere r.token = $1"
)

// loadRecovery reads a recovery by charge id (query recoveryByChargeQuery) or by token
// (recoveryByTokenQuery). found is false when there is none.
func loadRecovery(ctx context.Context, q querier, query string, arg any) (s recoveryState, found bool, err error) {
	s, err = scanRecovery(q.QueryRow(ctx, query, arg))
	if errors.Is(err, pgx.ErrNoRows) {
		return s, false, nil
	}
	if err != nil {
		return s, false, fmt.Errorf("load recovery: %w", err)
	}
	return s, true, nil
}

// scanRecovery reads one row of recoveryStateColumns.
func scanRecovery(row pgx.Row) (s recoveryState, err error) {
	err = row.Scan(&s.ChargeID, &s.Token, &s.Round, &s.Reason, &s.Status, &s.OpenedAt,
		&s.RemindersSent, &s.NextSeq, &s.ChargeStatus, &s.Amount, &s.Currency, &s.Description,
		&s.CustomerID, &s.CustomerRef, &s.Email, &s.StripeCustomerID,
		&s.SessionSeq, &s.SessionID, &s.SessionURL, &s.SessionExpiresAt, &s.SessionStatus)
	return s, err
}

// querier is what pgxpool.Pool, pgx.Conn and pgx.Tx share for reads.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// sessionIdempotencyKey is the Stripe idempotency key of a recovery session of installation:
// one per charge, recovery round and session number (recoveries.next_session_seq),
// "billingd-<installation>-recovery-<charge>-r<round>-s<n>". A retried job or a racing request
// reads the same number from the database and gets the same session; a fresh session, or a retry
// after Stripe stored a 5xx under the key, takes the next number. (A session whose request was in
// flight when billingd was upgraded from keys without the installation is made again under the
// new key; the first one is never recorded or shown to anyone, like a session made under a spent
// key, below.)
func sessionIdempotencyKey(installation string, chargeID int64, round, seq int) string {
	return stripeapi.KeyPrefix(installation) + fmt.Sprintf("recovery-%d-r%d-s%d", chargeID, round, seq)
}

// sessionMinLife is how long an open session must still have before it expires for billingd to
// send a customer to it; one closer to its end is expired and replaced.
const sessionMinLife = 10 * time.Minute

// usableSession reports whether the latest session of the round can take the customer now.
func (s recoveryState) usableSession(now time.Time) bool {
	return s.SessionStatus == "open" && s.SessionExpiresAt.After(now.Add(sessionMinLife))
}

// storeSessionQuery records a session once: the same session again (a retried job, a racing
// request with the same key) inserts nothing.
const storeSessionQuery = `
insert into billing.recovery_sessions (charge_id, round, seq, checkout_session_id, url, expires_at, idempotency_key)
values ($1, $2, $3, $4, $5, $6, $7)
on conflict do nothing`

// lockRecoveryQuery takes the recovery row, the one lock that session writers hold. Writers
// that also lock the charge (RecoveryPaidTx, the close trigger, the sweep) take the charge
// first, then the recovery, so the two orders never meet.
const lockRecoveryQuery = `
select r.status, r.round from billing.recoveries r where r.charge_id = $1 for update`

// openSessionQuery returns the open session of the charge, whichever round it belongs to.
const openSessionQuery = `
select checkout_session_id, url, expires_at from billing.recovery_sessions
where charge_id = $1 and status = 'open'`

// storeSessionTx records cs, created for s's round with number seq under idempotency key key, in tx. When the recovery
// closed or moved on since s was read, or another open session took its place, cs is recorded
// (if it can be) and an expire_recovery job is inserted for it, so that no page nobody tracks
// stays payable. It returns the session the customer should use: cs, or the other open one;
// usable is false when the recovery is no longer open.
func storeSessionTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], s recoveryState, seq int, cs *stripe.CheckoutSession, key string) (url string, usable bool, err error) {
	var status string
	var round int
	if err := tx.QueryRow(ctx, lockRecoveryQuery, s.ChargeID).Scan(&status, &round); err != nil {
		return "", false, fmt.Errorf("lock recovery of charge %d: %w", s.ChargeID, err)
	}
	_, err = tx.Exec(ctx, storeSessionQuery, s.ChargeID, s.Round, seq, cs.ID, cs.URL,
		time.Unix(cs.ExpiresAt, 0), key)
	if err != nil {
		return "", false, fmt.Errorf("store recovery session of charge %d: %w", s.ChargeID, err)
	}
	if _, err := tx.Exec(ctx, advanceSeqQuery, s.ChargeID, seq); err != nil {
		return "", false, fmt.Errorf("advance session number of charge %d: %w", s.ChargeID, err)
	}
	var openID, openURL string
	var openExpires time.Time
	err = tx.QueryRow(ctx, openSessionQuery, s.ChargeID).Scan(&openID, &openURL, &openExpires)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return "", false, fmt.Errorf("read open recovery session of charge %d: %w", s.ChargeID, err)
	}
	stale := status != "open" || round != s.Round
	if stale || openID != cs.ID {
		// Nobody will be sent to cs: make sure it cannot be paid. (When the recovery closed, the
		// close trigger ran before cs was recorded, so it did not expire cs.)
		if _, err := client.InsertTx(ctx, tx, ExpireRecoveryArgs{ChargeID: s.ChargeID, CheckoutSessionID: cs.ID}, nil); err != nil {
			return "", false, fmt.Errorf("insert expire_recovery for charge %d: %w", s.ChargeID, err)
		}
		if stale || openID == "" {
			return "", false, nil
		}
		return openURL, true, nil
	}
	return cs.URL, true, nil
}

// advanceSeqQuery moves the recovery's next session number past seq.
const advanceSeqQuery = `
update billing.recoveries set next_session_seq = greatest(next_session_seq, $2 + 1) where charge_id = $1`

// newSession creates the Checkout Session number seq of s's round at Stripe (outside any
// transaction), with the key that any retry of it reuses. When Stripe answers with a 5xx, which
// it stores under the key (the session may or may not exist, and that key will only ever replay
// the error), the number is spent: the next try uses the next key. A session made under a spent
// key is never recorded or shown to anyone, so nobody can pay it, and Stripe expires it in a day.
// It returns the session and its key, which storeSessionTx records.
func newSession(ctx context.Context, d *Deps, s recoveryState, seq int) (*stripe.CheckoutSession, string, error) {
	installation, err := d.Installation(ctx)
	if err != nil {
		return nil, "", fmt.Errorf("create recovery session for charge %d: %w", s.ChargeID, err)
	}
	key := sessionIdempotencyKey(installation, s.ChargeID, s.Round, seq)
	cs, err := createRecoverySession(ctx, d, s, installation, key)
	if err != nil {
		var serr *stripe.Error
		if errors.As(err, &serr) && serr.HTTPStatusCode >= 500 {
			if _, dbErr := d.Pool.Exec(ctx, advanceSeqQuery, s.ChargeID, seq); dbErr != nil {
				err = errors.Join(err, dbErr)
			}
		}
		return nil, "", fmt.Errorf("create recovery session for charge %d (round %d, session %d): %w", s.ChargeID, s.Round, seq, err)
	}
	if cs.ID == "" || cs.URL == "" || cs.ExpiresAt == 0 {
		return nil, "", fmt.Errorf("recovery session for charge %d: Stripe returned a session without id, url or expiry", s.ChargeID)
	}
	return cs, key, nil
}

// recoveryKinds lists the job kinds of the recovery flow.
func recoveryKinds() []string {
	return []string{
		NotifyRecoveryArgs{}.Kind(), DeliverNotificationArgs{}.Kind(), ExpireRecoveryArgs{}.Kind(),
		RefundPaymentArgs{}.Kind(), AdoptPaymentMethodArgs{}.Kind(), RecoverySweepArgs{}.Kind(),
	}
}

// registerRecovery adds the workers of the recovery flow.
func registerRecovery(workers *river.Workers, d *Deps) error {
	n := newNotifier(d.Config, d.Logger)
	for _, err := range []error{
		river.AddWorkerSafely(workers, &notifyRecoveryWorker{d: d}),
		river.AddWorkerSafely(workers, &deliverNotificationWorker{d: d, notifier: n}),
		river.AddWorkerSafely(workers, &expireRecoveryWorker{d: d}),
		river.AddWorkerSafely(workers, &refundPaymentWorker{d: d}),
		river.AddWorkerSafely(workers, &adoptPaymentMethodWorker{d: d}),
		river.AddWorkerSafely(workers, &recoverySweepWorker{d: d}),
	} {
		if err != nil {
			return fmt.Errorf("recovery workers: %w", err)
		}
	}
	return nil
}

// recoveryPeriodicJobs returns the periodic jobs of the recovery flow.
func recoveryPeriodicJobs(d *Deps) ([]*river.PeriodicJob, error) {
	sweep, err := recoverySweepPeriodic(d)
	if err != nil {
		return nil, err
	}
	return []*river.PeriodicJob{sweep}, nil
}
