package daemon

// # The login core
//
// The login core (machine.go) is a pure state machine: handle(now, event)
// returns the effects to carry out and does nothing itself. The runner
// (daemon.go) is the only caller: one goroutine takes events from an inbox
// (commands from the local API, dial results, answers, pushes, lost
// connections, helper results, timer ticks), hands each to the machine,
// and executes the effects in order: Persist first (one bbolt commit at
// most per event, none when nothing durable changed), so that nothing is
// answered or sent before it is durable; then dials, requests, closes,
// helper runs, events for subscribers, answers to callers and systemd's
// STATUS= line. Every goroutine the runner starts reports back through the
// inbox and is waited for before Run returns. Results carry the connection
// id, or the goal's generation for the helper, and the machine drops those
// of a connection or goal that is no longer current.
//
// # Phases
//
//	Idle        logged out, nothing to do                          LOGOUT
//	Fetching    the login waits for usersig_command (no usable UserSig)
//	WaitRetry   waiting to dial, or to repeat a request on the open connection
//	Dialing     a connection attempt is under way
//	Requesting  connected; login, resume or logout waits for its answer
//	Online      logged in and connected                            LOGINED
//	KickedWait  kicked; logging in again later ([kick] after = "relogin")  LOGOUT
//	Stopped     shutting down
//
// The login status is derived: Online is LOGINED; Fetching, WaitRetry,
// Dialing and Requesting are LOGINED while the session lives on (a
// reconnect resumes it), LOGINING before the first session, and LOGOUT when
// the only thing left to do is to deliver a logout; everything else is
// LOGOUT. "connected" is Online; "connection" is connected, connecting
// (first attempts), reconnecting, or idle.
//
// # Clocks
//
// Every delay is measured on the monotonic clock. The gateway's clock is
// anchored on it when a login or resume answer in this run tells it, so a
// step of the wall clock (timesyncd on a board without RTC) changes no
// expiry decision. Before that, the wall clock is used only when NTP has
// synchronised it, and the offset persisted by an earlier run is shown,
// never used. With neither, no expiry decision is made on the device.
//
// # Transitions
//
// The table below is checked against the code by TestDocTransitionTable
// (go test ./daemon -run TestDocTransitionTable -update rewrites it). Each
// row is a case of TestTransitions: the phase the machine was driven to,
// the event, the phase after it and the effects in order (log lines and
// metrics left out).
//
//	| from       | event                                                      | to         | effects, in order
//	|------------|------------------------------------------------------------|------------|--------------------
//	| Idle       | login: dial                                                | Dialing    | emit LOGINING, emit onConnecting, dial
//	| Idle       | login with a bad UserSig: refused, nothing changes         | Idle       | answer 70003
//	| Idle       | login with another user's UserSig: 70013                   | Idle       | answer 70013
//	| Idle       | logout: nothing to do                                      | Idle       | persist, answer 0
//	| Dialing    | dialed: send login                                         | Requesting | send login
//	| Dialing    | refused: retry with backoff                                | WaitRetry  | emit onConnectFailed:70169
//	| Dialing    | UserSig refused at CONNECT (4): permanent, 70009           | Idle       | persist, emit onConnectFailed:70009, answer 70009, emit LOGOUT
//	| Dialing    | UserSig expired long ago at CONNECT (5): 70001             | Idle       | persist, emit onConnectFailed:70001, emit onUserSigExpired:70001, answer 70001, emit LOGOUT
//	| Dialing    | broker unavailable (3, flooding): retry                    | WaitRetry  | emit onConnectFailed:70169
//	| Requesting | login ok: online, answered after persist                   | Online     | persist, emit onConnectSuccess, answer 0, emit LOGINED
//	| Requesting | 70050: wait the minute on the same connection              | WaitRetry  | emit onConnectFailed:70050
//	| Requesting | permanent code: LOGOUT                                     | Idle       | persist, answer 70009, close goodbye, emit LOGOUT
//	| Requesting | no answer: abort so the broker publishes the Will          | WaitRetry  | abort, emit onConnectFailed:70169
//	| Online     | connection lost: LOGINED, reconnecting                     | WaitRetry  | emit onConnectFailed:70169
//	| Online     | kick for this session: LOGOUT, no relogin                  | Idle       | persist, close goodbye, emit onKickedOffline:6208, emit LOGOUT
//	| Online     | kick with relogin policy: KickedWait                       | KickedWait | persist, close goodbye, emit onKickedOffline:6208, emit LOGOUT
//	| Online     | kick for another session: ignored                          | Online     | -
//	| Online     | usersig_expired without helper: LOGOUT 70001               | Idle       | persist, emit onUserSigExpired:70001, close goodbye, emit LOGOUT
//	| Online     | usersig_expired with helper: fetch, LOGINING               | Fetching   | persist, emit onUserSigExpired:70001, helper, emit LOGINING
//	| Online     | logout: persist the pending logout, send it, answer        | Requesting | persist, send logout, answer 0, emit LOGOUT
//	| Online     | login as another user: log out first                       | Requesting | persist, send logout, emit LOGINING
//	| WaitRetry  | logout: pending logout persisted, answered at once         | Dialing    | persist, emit LOGOUT, emit onConnecting, dial, answer 0
//	| KickedWait | logout: the relogin is cancelled                           | Idle       | persist, answer 0
//	| Idle       | login without UserSig, helper configured: fetch            | Fetching   | helper, emit LOGINING
//	| Fetching   | helper prints a UserSig: dial                              | Dialing    | persist, emit onConnecting, dial
//	| Fetching   | helper fails for a login someone asked for: LOGOUT 6206    | Idle       | persist, answer 6206, emit LOGOUT
//	| Fetching   | logout: the helper is cancelled                            | Idle       | persist, answer 6014, cancel helper, answer 0, emit LOGOUT
//	| WaitRetry  | tick when due: dial again (resume follows)                 | Dialing    | emit onConnecting, dial
//	| KickedWait | tick when due: log in again                                | Dialing    | emit LOGINING, emit onConnecting, dial
//	| Online     | tick at renewal time: run the helper, stay online          | Online     | helper
//	| Online     | a late answer on an old connection: dropped                | Online     | -
//	| Stopped    | anything: nothing                                          | Stopped    | -
//	| Online     | stop: goodbye, no logout                                   | Stopped    | close goodbye
//
// End of the table.
//
// Beyond the table, TestMachineProperties drives the machine with long
// seeded random sequences of events against a model of the gateway and
// checks its invariants after every step.
